"""The repository keeps its shape: no import cycles, no import that climbs the layers, no file past
the line budget; and the measuring tool finds each of those in a made-up tree."""
from __future__ import annotations

from pathlib import Path

from geomerase.benchmarks.code_structure import report

REPO = Path(__file__).resolve().parents[2]


def test_repository_has_no_cycles_no_climbing_imports_and_no_oversized_files():
    r = report(REPO, max_lines=600)
    assert r["modules"] > 50
    assert r["import_cycles"] == []
    assert r["climbing_imports"] == []
    assert r["files_over_max_lines"] == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_tool_finds_cycles_climbing_imports_and_long_files(tmp_path):
    for pkg in ("core", "data", "geomerase"):
        _write(tmp_path, f"{pkg}/__init__.py", "")
    _write(tmp_path, "core/a.py", "from geomerase.core.b import f\n")
    _write(tmp_path, "core/b.py", "def f():\n    from geomerase.core import a  # lazy, still a dependency\n")
    _write(tmp_path, "core/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from geomerase.core.d import D\n")
    _write(tmp_path, "core/d.py", "from . import c\n" + "x = 1\n" * 30)
    _write(tmp_path, "data/x.py", "import geomerase.core.a\n")
    r = report(tmp_path, max_lines=20)
    assert r["import_cycles"] == [["geomerase.core.a", "geomerase.core.b"]]  # c <-> d only for type checking
    assert r["climbing_imports"] == [("geomerase.data.x", "geomerase.core.a")]
    assert r["files_over_max_lines"] == [(31, "core/d.py")]
