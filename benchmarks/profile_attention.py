"""Host vs device time of one attention call per SD-1.5 shape: Triton vs cuDNN / flash SDPA.

``bench_attention`` times CUDA events around one Python call after an L2 flush, so when
the host side of a call is slower than its kernels the number is host time (the small
SD shapes: ~10 µs of GPU work, 50-170 µs measured). This script separates the two, per
shape and backend, for the forward and the backward (``torch.autograd.grad``):

* ``host_us``  - wall time to *enqueue* N back-to-back calls / N, no sync inside the loop:
                 the Python + launch cost of one call (the GPU does not block the host).
* ``eager_us`` - CUDA events around the same N calls / N (no L2 flush): what a model that
                 calls attention back to back gets; ~``max(host, device)``.
* ``graph_us`` - the call captured ``K`` times in one CUDA graph, replayed: device time
                 only. The backward is captured together with its forward (autograd runs
                 backward kernels on the forward's stream), so ``bwd = both - fwd``.
* ``launches`` - Triton kernel launches per call (the module's counter; triton only).

``host_bound`` is ``eager / graph``: ≫ 1 means the call is limited by the host.
SDPA backends are selected with the global ``torch.backends.cuda.enable_*_sdp`` flags,
not the ``sdpa_kernel`` context manager, so its enter/exit is not in the host time.

Without a GPU (dry run) the Triton launches are replaced by no-ops (``--mock-launch``, the
default there): ``host_us`` is then the wrapper's own Python cost on this CPU, per shape.

Run:  python -m geomerase.benchmarks.profile_attention [--out DIR] [--budget-s 30]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks._bootstrap  # noqa: F401
    from geomerase.benchmarks import common
    from geomerase.benchmarks.bench_attention import SD15_SHAPES
else:
    from . import common
    from .bench_attention import SD15_SHAPES

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NAN = float("nan")
# bench_attention's SD-1.5 table, small shapes first: they are the host-overhead question, and a
# budget cut drops the big ones. (name, heads, Sq, Sk, head_dim), batch 8.
SHAPES = sorted(SD15_SHAPES, key=lambda s: s[1] * s[2] * s[3] * s[4])
SDPA_FLAGS = {"sdpa-cudnn": "cudnn", "sdpa-flash": "flash"}
COLS = ["shape", "backend", "fwd_host_us", "fwd_eager_us", "fwd_graph_us", "fwd_host_bound",
        "bwd_host_us", "bwd_eager_us", "bwd_graph_us", "bwd_host_bound", "fwd_launches", "bwd_launches",
        "triton_config"]


def _set_sdpa(only: str | None) -> None:
    # global flags, so that no context manager runs inside the timed loop
    for kind in ("flash", "mem_efficient", "math", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{kind}_sdp")(only is None or kind == only)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _mock_launches() -> Callable[[], int]:
    """Replace every Triton launch by a no-op that counts; returns the counter."""
    from triton.runtime import jit

    calls = [0]

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - JITFunction.run's signature
        calls[0] += 1
        return None

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        cls.run = run
    return lambda: calls[0]


def _per_call_us(fn: Callable[[], Any], n: int, on_gpu: bool, rounds: int = 3) -> tuple[float, float]:
    """(host µs, eager µs) per call: the best of ``rounds`` runs of ``n`` back-to-back calls
    (the best, since other processes on the host only ever add time)."""
    runs = [_one_round(fn, n, on_gpu) for _ in range(rounds)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _one_round(fn: Callable[[], Any], n: int, on_gpu: bool) -> tuple[float, float]:
    if on_gpu:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    if not on_gpu:
        return host, NAN
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) / n * 1e3


def _graph_us(body: Callable[[], Any], reps: int, per_graph: int) -> float:
    """Device µs per call: ``per_graph`` calls captured in one CUDA graph, replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            body()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / (reps * per_graph) * 1e3


def _triton_config(attn: Any, q, k, v) -> str:
    """The frozen launch config per kernel of this shape's plan, e.g. ``fwd 128x64 w8s3 g8x64``
    (tile, warps, stages, grid: the grid shows how many programs fill the SMs)."""
    plan = attn._fwd_plan(q, k, v)

    def cfg(launch: Any) -> str:
        if launch is None:
            return "-"
        kw = launch.kwargs
        grid = "x".join(str(g) for g in launch.grid) if isinstance(launch.grid, tuple) else "auto"
        return f"{kw.get('BLOCK_M', '?')}x{kw.get('BLOCK_N', '?')} w{kw.get('num_warps', '?')}s{kw.get('num_stages', '?')} g{grid}"
    parts = [f"fwd {cfg(plan.launch)}"]
    for bp in plan.bwd.values():
        # the backward scheme the plan chose (and, when it timed them, each candidate's ms)
        timed = " ".join(f"{n}={ms * 1e3:.0f}us" for n, ms in bp.scheme_ms.items())
        kernels = " ".join(f"{n} {cfg(launch)}" for n, launch in bp.launches.items())
        parts.append(f"bwd {bp.scheme} split {bp.n_split} ({timed or 'not timed'}): {kernels}")
    return "; ".join(parts)  # no "|": the cell sits in a Markdown table


def profile_one(name: str, shape: tuple, args: argparse.Namespace, on_gpu: bool, attn: Any,
                mock_count: Callable[[], int] | None, errors: list[str]) -> dict[str, Any]:
    label, h, sq, sk, d = shape
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(args.batch, h, s, d, generator=g).to(device, dtype).requires_grad_(True)
               for s in (sq, sk, sk))
    do = torch.randn(args.batch, h, sq, d, generator=g).to(device, dtype)
    overrides = contextlib.nullcontext()
    if name.startswith("triton"):
        # "triton-fused" / "triton-two_kernel": one backward scheme forced (else the plan's pick)
        scheme = name.partition("-")[2] or None
        if scheme and hasattr(attn, "kernel_overrides"):
            overrides = attn.kernel_overrides(bwd_scheme=scheme)
        fn = attn.flash_attention
        count = mock_count or attn.launch_count
    else:
        _set_sdpa(SDPA_FLAGS[name])
        fn, count = _sdpa, None
    row: dict[str, Any] = {"shape": label, "backend": name}

    def fwd() -> None:
        with torch.no_grad():
            fn(q, k, v)

    def both() -> None:
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    with overrides:  # the plans built here keep it for their backward
        try:
            for _ in range(2):  # compile / tune / plan outside the timings
                both()
            out = fn(q, k, v)

            def bwd() -> None:
                torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

            n = args.calls
            if count is not None:
                c0 = count()
                fwd()
                c1 = count()
                bwd()
                row["fwd_launches"], row["bwd_launches"] = c1 - c0, count() - c1
            row["fwd_host_us"], row["fwd_eager_us"] = _per_call_us(fwd, n, on_gpu)
            row["bwd_host_us"], row["bwd_eager_us"] = _per_call_us(bwd, n, on_gpu)
            if on_gpu:
                # ~10 ms of device work per replay batch, at most 20 calls in one graph
                per = max(1, min(20, int(2000 / max(row["fwd_eager_us"], 1.0))))
                row["fwd_graph_us"] = common.try_measure(lambda: _graph_us(fwd, 5, per), errors,
                                                         f"{label}/{name}/graph-fwd")
                both_us = common.try_measure(lambda: _graph_us(both, 5, max(1, per // 3)), errors,
                                             f"{label}/{name}/graph-both")
                row["bwd_graph_us"] = both_us - row["fwd_graph_us"]
                for kind in ("fwd", "bwd"):
                    dev = row[f"{kind}_graph_us"]
                    row[f"{kind}_host_bound"] = row[f"{kind}_eager_us"] / dev if dev == dev and dev > 0 else NAN
            if name.startswith("triton") and hasattr(attn, "_fwd_plan"):
                row["triton_config"] = _triton_config(attn, q, k, v)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not cost the others
            errors.append(f"{label}/{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            if on_gpu:
                torch.cuda.synchronize()
        finally:
            if not name.startswith("triton"):
                _set_sdpa(None)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=None, help="calls per host/eager timing (default 30 GPU, 20 CPU)")
    ap.add_argument("--shapes", default=None, help="comma list of shape names to keep")
    ap.add_argument("--backends", default="triton,sdpa-cudnn,sdpa-flash",
                    help="also triton-fused / triton-two_kernel: one backward scheme forced")
    ap.add_argument("--budget-s", type=float, default=30, help="start no new shape after this many seconds")
    ap.add_argument("--mock-launch", action="store_true", help="Triton launches become no-ops (default on CPU)")
    ap.add_argument("--module", default="geomerase.kernels.attention",
                    help="attention module to profile (e.g. an older copy, for before/after host cost)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = common.cuda_ok()
    mock = args.mock_launch or not on_gpu
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    args.calls = args.calls or (30 if on_gpu else 20)
    attn = importlib.import_module(args.module)
    mock_count = _mock_launches() if mock else None
    names = [n for n in args.backends.split(",") if n.startswith("triton") or (on_gpu and n in SDPA_FLAGS)]
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    config = {"batch": args.batch, "dtype": "bf16" if on_gpu else "fp32", "calls": args.calls,
              "mock_launch": mock, "module": args.module, "backends": names,
              "autotune": os.environ.get("GEOMERASE_FLASH_AUTOTUNE", "1") != "0" and on_gpu}
    notes = ["host_us: enqueue cost per call (no sync in the loop); eager_us: CUDA events around "
             "back-to-back calls; graph_us: CUDA-graph replay (device only); bwd graph = (fwd+bwd) - fwd",
             "host_bound = eager / graph (>> 1: host-limited); launches: Triton kernels per call"]
    if mock:
        notes.append("mock_launch: Triton kernels are not run; host_us is the wrapper's Python cost alone")
    t0 = time.monotonic()
    stem = "attention_profile" if on_gpu else "attention_profile_cpu"
    for shape in shapes:
        if time.monotonic() - t0 > args.budget_s:
            errors.append(f"{shape[0]}: skipped, budget of {args.budget_s}s spent")
            continue
        for name in names:
            row = profile_one(name, shape, args, on_gpu, attn, mock_count, errors)
            rows.append(row)
            print(" ".join(f"{c}={common._fmt(row.get(c, NAN))}" for c in COLS if c in row), flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
        # rewritten after every shape: a stage killed by its timeout keeps what it measured
        md = common.write_results(stem, args.out, common.environment(), config, rows,
                                  [("host vs device (µs per call)", rows, COLS)], errors, notes)
    if not rows:
        md = common.write_results(stem, args.out, common.environment(), config, rows, [], errors, notes)
    print(f"\nwritten: {md} (+ .json, .csv); {len(errors)} failure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
