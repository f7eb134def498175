"""Make ``import geomerase`` work from a plain checkout, without ``pip install``.

``setup.py`` installs the top-level folders ``core/``, ``kernels/``, ... as
``geomerase.core``, ``geomerase.kernels``, ...; this module reproduces that mapping with a
meta-path finder so that scripts (``python benchmarks/bench_attention.py``), pytest
(``python3 -m pytest -p benchmarks._bootstrap``) and the GPU check script run against the
working tree on a machine where nothing can be installed. Importing it is a no-op when a
``geomerase`` package is already importable.
"""
from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup_packages() -> dict[str, str]:
    """``setup.py``'s ``PACKAGES`` literal (import name -> folder), read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{REPO / 'setup.py'} has no PACKAGES mapping")


SUBPACKAGES = _setup_packages()


class _RepoFinder(importlib.abc.MetaPathFinder):
    """Finds ``geomerase`` and its mapped subpackages in the repository folders."""

    def find_spec(self, fullname, path=None, target=None):
        folder = SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        pkg_dir = REPO / folder
        init = pkg_dir / "__init__.py"
        if not init.exists():
            if fullname != "geomerase" or not pkg_dir.is_dir():
                return None
            # an empty top-level package is still a package
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(pkg_dir)]
            return spec
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(pkg_dir)])


def install() -> bool:
    """Register the finder unless ``geomerase`` already resolves to this repository; returns
    True when the finder is (now) in place."""
    if any(isinstance(f, _RepoFinder) for f in sys.meta_path):
        return True
    try:
        spec = importlib.util.find_spec("geomerase.kernels")
    except ImportError:
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO):
        return False  # an editable install of this checkout already maps everything
    sys.meta_path.insert(0, _RepoFinder())
    for name in [m for m in sys.modules if m == "geomerase" or m.startswith("geomerase.")]:
        del sys.modules[name]  # drop a foreign installation's modules
    return True


install()


# pytest plugin entry point (``-p benchmarks._bootstrap``): nothing to add, importing did it.
def pytest_configure(config) -> None:  # noqa: D401
    install()
