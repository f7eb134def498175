"""``benchmarks/_bootstrap.py`` maps the repository folders under ``geomerase`` exactly as setup.py installs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_package_map_is_read_from_setup_py():
    from geomerase.benchmarks import _bootstrap

    assert _bootstrap.SUBPACKAGES["geomerase"] == "geomerase"
    assert _bootstrap.SUBPACKAGES["geomerase.core"] == "core"
    assert all((REPO / folder / "__init__.py").is_file() for folder in _bootstrap.SUBPACKAGES.values())


def test_plain_checkout_imports_through_the_finder(tmp_path):
    # without site-packages (-S: no editable install, no dependencies) the finder alone resolves a mapped
    # subpackage to this checkout's folder
    code = ("import sys, importlib.util; sys.path.insert(0, %r); import benchmarks._bootstrap; "
            "print(importlib.util.find_spec('geomerase.core.geometry').origin)") % str(REPO)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "core" / "geometry.py"
