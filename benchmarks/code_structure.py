"""The code's shape, measured from the source: import cycles, imports that climb the layers, the longest
functions and classes, and files over a line budget.

    python -m geomerase.benchmarks.code_structure [--repo DIR] [--top 5] [--max-lines 500]

The import graph is static (``ast``): every ``import``/``from ... import`` of a project module counts,
at module level or inside a function (a lazy import is still a dependency), except those under
``if TYPE_CHECKING:``. Layers, lowest first (:data:`LAYERS`): a module may import its own layer and
the ones below, never one above. ``tests/benchmarks/test_code_structure.py`` holds the repository to
no cycles and no climbing imports.
"""
from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

#: Top-level folder -> import package, as setup.py maps them.
FOLDERS = {"geomerase": "geomerase", "core": "geomerase.core", "kernels": "geomerase.kernels",
           "distributed": "geomerase.distributed", "data": "geomerase.data", "configs": "geomerase.configs",
           "benchmarks": "geomerase.benchmarks"}
#: Layer of each package, lowest first; ``geomerase`` is the package's own modules (CLI, demo, stages).
LAYERS = {"geomerase.kernels": 0, "geomerase.data": 1, "geomerase.configs": 1, "geomerase.core": 2,
          "geomerase.distributed": 3, "geomerase": 4, "geomerase.benchmarks": 5}
#: Imports allowed to point up a layer: the CLI's ``bench`` commands run the benchmarks.
UPWARD_ALLOWED = {("geomerase.cli", "geomerase.benchmarks"), ("geomerase.commands", "geomerase.benchmarks")}


@dataclass
class Structure:
    """What :func:`measure` finds in a repository."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)
    functions: list[tuple[int, str]] = field(default_factory=list)
    classes: list[tuple[int, str]] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)


def module_name(repo: Path, path: Path) -> str:
    """``core/models.py`` -> ``geomerase.core.models``; ``geomerase/cli.py`` -> ``geomerase.cli``."""
    rel = path.relative_to(repo).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                out.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return out


def _targets(node: ast.AST, here: str, is_pkg: bool, modules: dict[str, Path]) -> set[str]:
    """Project modules that an import node loads (the most specific known name)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        pkg = here.split(".")
        pkg = pkg[: len(pkg) - node.level + (1 if is_pkg else 0)]
        base = ".".join(pkg + ([base] if base else []))
    out = set()
    for a in node.names:
        full = f"{base}.{a.name}"
        out.add(full if full in modules else base)
    return {m for m in out if m in modules}


def measure(repo: Path) -> Structure:
    """Parse every project source file under ``repo`` once."""
    s = Structure()
    files = [p for folder in FOLDERS for p in sorted((repo / folder).rglob("*.py"))]
    s.modules = {module_name(repo, p): p for p in files}
    for name, path in s.modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        rel = str(path.relative_to(repo))
        s.lines[rel] = len(text.splitlines())
        skip = _type_checking_lines(tree)
        s.imports[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in skip:
                s.imports[name] |= _targets(node, name, path.name == "__init__.py", s.modules) - {name}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                s.functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                s.classes.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    s.functions.sort(reverse=True)
    s.classes.sort(reverse=True)
    return s


def cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(imports.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(imports):
        if v not in index:
            visit(v)
    return sorted(out)


def package_of(module: str) -> str:
    """The layered package a module belongs to (``geomerase.core.models`` -> ``geomerase.core``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in LAYERS else "geomerase"


def climbing_imports(imports: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs where a lower layer imports a higher one (minus :data:`UPWARD_ALLOWED`)."""
    out = []
    for a, targets in imports.items():
        for b in targets:
            pa, pb = package_of(a), package_of(b)
            if LAYERS[pb] > LAYERS[pa] and (a, pb) not in UPWARD_ALLOWED:
                out.append((a, b))
    return sorted(out)


def report(repo: Path, top: int = 5, max_lines: int = 500) -> dict:
    """The numbers :func:`main` prints."""
    s = measure(repo)
    return {"modules": len(s.modules), "source_lines": sum(s.lines.values()),
            "longest_functions": s.functions[:top], "longest_classes": s.classes[:top],
            "files_over_max_lines": sorted(((n, f) for f, n in s.lines.items() if n > max_lines), reverse=True),
            "import_cycles": cycles(s.imports), "climbing_imports": climbing_imports(s.imports)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    ap.add_argument("--top", type=int, default=5, help="longest functions and classes to list")
    ap.add_argument("--max-lines", type=int, default=500, help="list files longer than this")
    a = ap.parse_args(argv)
    print(json.dumps(report(Path(a.repo), a.top, a.max_lines), indent=1))


if __name__ == "__main__":
    main()
