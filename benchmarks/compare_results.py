"""``geomerase bench compare A B``: are two erasing-benchmark runs the same table?

Reads each run's ``results.json`` (a run folder or the file itself) and compares every
``{concept: {prompt_set: {arm: {icr, fid, fidelity, n}}}}`` entry. ICR and ``n`` are counts
over the same seeds, so they must match exactly; FID and fidelity are floats and must agree
within ``tol`` (absolute). Exits 1 and lists each difference when the tables differ, so a
reproducibility check can run as one command.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Difference:
    """One cell that differs between the runs."""

    where: str
    """``concept/prompt_set/arm/metric``, or a missing key's path."""
    a: Any
    """Value in the first run (None when absent)."""
    b: Any
    """Value in the second run (None when absent)."""


def load_results(path: str | Path) -> dict:
    """``results.json`` of a run folder, or the file itself; a clear error when neither exists."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is it an erasing-benchmark run folder?)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def compare(a: dict, b: dict, tol: float = 0.0) -> list[Difference]:
    """Every difference between two results trees; empty when they are the same table.

    Args:
        a, b: ``results.json`` contents.
        tol: absolute tolerance for the float metrics (``fid``, ``fidelity``); ``icr`` and
            ``n`` are compared exactly.
    """
    diffs: list[Difference] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                sub = f"{path}/{k}" if path else str(k)
                if k not in x or k not in y:
                    diffs.append(Difference(sub, x.get(k), y.get(k)))
                else:
                    walk(x[k], y[k], sub)
            return
        metric = path.rsplit("/", 1)[-1]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and metric in ("fid", "fidelity"):
            if not (math.isclose(x, y, rel_tol=0.0, abs_tol=tol) or (math.isnan(x) and math.isnan(y))):
                diffs.append(Difference(path, x, y))
        elif x != y:
            diffs.append(Difference(path, x, y))

    walk(a, b, "")
    return diffs


def max_abs_diff(a: dict, b: dict, metric: str) -> float:
    """Largest ``|a - b|`` of ``metric`` over the cells both runs have (0.0 when none)."""
    out = 0.0
    for c in set(a) & set(b):
        for pset in set(a[c]) & set(b[c]):
            for arm in set(a[c][pset]) & set(b[c][pset]):
                x, y = a[c][pset][arm].get(metric), b[c][pset][arm].get(metric)
                if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                    out = max(out, abs(x - y))
    return out


def main(a_path: str, b_path: str, tol: float = 0.0) -> int:
    a, b = load_results(a_path), load_results(b_path)
    diffs = compare(a, b, tol)
    cells = sum(len(arms) for c in a.values() for arms in c.values())
    print(f"{cells} (concept, prompt set, arm) cells; max |diff|: "
          + ", ".join(f"{m} {max_abs_diff(a, b, m):.3g}" for m in ("icr", "fid", "fidelity")))
    for d in diffs:
        print(f"DIFFERS {d.where}: {d.a!r} vs {d.b!r}")
    print("same table" if not diffs else f"{len(diffs)} difference(s) (tolerance {tol:g} on fid/fidelity, 0 on icr/n)")
    return 0 if not diffs else 1
