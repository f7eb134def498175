"""Shared benchmark harness: timing, failure capture, environment record, result files.

Every benchmark writes ``<name>.json`` (environment + config + rows), ``<name>.csv`` (rows)
and ``<name>.md`` (environment, config, a compact table) into ``--out`` (default
``benchmarks/results/``). A measurement that raises is recorded as NaN with its error text,
never a crash: one failing backend or kernel config must not cost the other numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from geomerase.data.shards import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAN = float("nan")


def cuda_ok() -> bool:
    return torch.cuda.is_available()


def environment() -> dict[str, Any]:
    """Hardware and software versions for the result header."""
    env: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for mod in ("triton", "diffusers", "xformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: record, do not fail
            env[mod] = None
    if cuda_ok():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["gpu"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def detection_scores(pred: Sequence[Iterable[int]], true: Sequence[Iterable[int]], flagged: Sequence[bool],
                     has: Sequence[bool]) -> dict[str, Any]:
    """Cell precision/recall/F1 and counts (micro-averaged over images, :func:`geomerase.core.geometry.
    cell_precision_recall`) of predicted vs true cells, and image precision/recall of ``flagged`` (the
    detector found anything) vs ``has`` (the image holds the concept), rounded to 4 places."""
    from geomerase.core.geometry import cell_precision_recall

    pr = cell_precision_recall(pred, true)
    itp = sum(f and h for f, h in zip(flagged, has, strict=True))
    return {"cell_precision": round(pr["precision"], 4), "cell_recall": round(pr["recall"], 4),
            "cell_f1": round(pr["f1"], 4), "tp": pr["tp"], "fp": pr["fp"], "fn": pr["fn"],
            "image_precision": round(itp / max(1, sum(flagged)), 4), "image_recall": round(itp / max(1, sum(has)), 4)}


def boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two ``[x1, y1, x2, y2]`` boxes share an area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def try_measure(fn: Callable[[], float], errors: list[str], label: str) -> float:
    """Run ``fn`` (returns a number); on any exception record it under ``label`` and return NaN."""
    try:
        value = float(fn())
        return value if math.isfinite(value) else NAN
    except Exception as exc:  # noqa: BLE001 - a benchmark must survive any backend failure
        msg = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        errors.append(msg)
        if os.environ.get("GEOMERASE_BENCH_TRACEBACK"):
            traceback.print_exc()
        if cuda_ok():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return NAN


def time_ms(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none: list[torch.Tensor] | None = None, min_reps: int = 3) -> float:
    """Median milliseconds per call.

    On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call,
    warm-up first) when triton imports, else CUDA events by hand. On CPU: wall clock
    around each call after one warm-up call.
    """
    if cuda_ok():
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
        return _cuda_event_ms(fn, warmup_ms, rep_ms, grad_to_none)
    fn()  # warm-up (allocations, interpreter caches)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < deadline:
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _cuda_event_ms(fn, warmup_ms, rep_ms, grad_to_none) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    per = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / per))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / per))):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, out_dir: str | os.PathLike | None, env: dict, config: dict,
                  rows: list[dict[str, Any]], tables: list[tuple[str, list[dict], list[str]]],
                  errors: list[str], notes: list[str] = ()) -> Path:
    """Write ``name``.json/.csv/.md under ``out_dir``; returns the Markdown path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "config": config, "rows": rows, "errors": errors, "notes": list(notes)}
    atomic_write(out / f"{name}.json", json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n")
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("nan" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, ""))
                        for c in cols})
    hw = env.get("gpu") or f"CPU only: {env.get('cpu')} ({env.get('cpu_count')} cores)"
    md = [f"# {name}", "",
          f"- hardware: {hw}",
          f"- torch {env.get('torch')}, triton {env.get('triton')}, xformers {env.get('xformers')}, "
          f"CUDA {env.get('cuda')}, TRITON_INTERPRET={env.get('triton_interpret')}",
          f"- config: {json.dumps(config, default=str)}",
          f"- when: {env.get('time_utc')}", ""]
    md += [f"- {n}" for n in notes]
    for title, trows, tcols in tables:
        md += ["", f"## {title}", "", markdown_table(trows, tcols)]
    if errors:
        md += ["", "## failures (recorded as NaN)", ""] + [f"- `{e}`" for e in errors[:60]]
    path = out / f"{name}.md"
    atomic_write(path, "\n".join(md) + "\n")
    return path
