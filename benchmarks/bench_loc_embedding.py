"""Benchmark the fused location-token embedding against the textual-inversion pattern.

CLIP text-encoder input embedding: vocabulary 49408 + 16 location tokens, width 768,
batch 64 x 77 tokens, the 16 new rows trainable. Compared per backward step:

* ``dense_mask`` - a full ``nn.Embedding(V, D)`` with ``requires_grad`` plus a gradient
  mask zeroing the frozen rows (what textual-inversion scripts do): a ``(V, D)`` gradient.
* ``torch_ref``  - ``loc_embedding_ref``: pure torch, gradient only for the ``(R, D)`` rows.
* ``triton``     - the fused kernel ``loc_embedding`` (on CPU: the Triton interpreter, so
  its time is not a speed number there).

Reported: backward time (median), peak memory of the backward above what was allocated
before it, and the gradient bytes the step leaves behind (analytic, ``sum(p.grad.nbytes)``).
Peak memory: CUDA - ``torch.cuda.max_memory_allocated``; CPU - the torch profiler's memory
events (``Total Allocated`` of torch's CPU allocator; the interpreter's numpy scratch is not
seen). Failures are NaN.

Run:  python -m geomerase.benchmarks.bench_loc_embedding [--tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks._bootstrap  # noqa: F401
    from geomerase.benchmarks import common
else:
    from . import common

import torch  # noqa: E402

NAN = float("nan")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_peak_bytes(fn) -> float:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0.0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return float(max(e["args"]["Total Allocated"] for e in mem) - base)


def peak_bytes(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    return cpu_peak_bytes(fn)


def build(variant: str, cfg: dict, device: str):
    """Returns ``(forward_fn, trainable_params)`` for one variant."""
    from geomerase.kernels import loc_embedding_ref

    vocab, dim, rows, dtype = cfg["vocab"], cfg["dim"], cfg["rows"], DTYPES[cfg["dtype"]]
    start = vocab - rows
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(vocab, dim, generator=g) * 0.02).to(device, dtype)
    pos_w = (torch.randn(cfg["seq"], dim, generator=g) * 0.02).to(device, dtype)
    if variant == "dense_mask":
        emb = torch.nn.Embedding(vocab, dim, device=device, dtype=dtype)
        emb.weight.data.copy_(table)
        frozen_rows = torch.ones(vocab, 1, device=device, dtype=torch.bool)
        frozen_rows[start:] = False
        # textual inversion: every row gets a gradient, the frozen ones are masked after
        emb.weight.register_hook(lambda grad: grad.masked_fill(frozen_rows, 0.0))
        positions = torch.arange(cfg["seq"], device=device)

        def fwd(ids):
            return emb(ids) + pos_w[positions]
        return fwd, [emb.weight]
    train = table[start:].clone().float().requires_grad_(True)
    if variant == "torch_ref":
        return (lambda ids: loc_embedding_ref(ids, table, train, start, pos_w)), [train]
    if variant == "triton":
        from geomerase.kernels import loc_embedding
        return (lambda ids: loc_embedding(ids, table, train, start, pos_w)), [train]
    raise ValueError(variant)


def bench_variant(variant, cfg, device, errors, opts):
    row = {"variant": variant, **{k: cfg[k] for k in ("vocab", "dim", "rows", "batch", "seq", "dtype")}}
    try:
        fwd, params = build(variant, cfg, device)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{variant}/build: {type(exc).__name__}: {exc}")
        return {**row, "fwd_ms": NAN, "bwd_ms": NAN, "bwd_peak_mib": NAN, "grad_mib": NAN}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab"] - cfg["rows"], (cfg["batch"], cfg["seq"]), generator=g)
    ids[:, 1:1 + cfg["rows"]] = torch.arange(cfg["vocab"] - cfg["rows"], cfg["vocab"])  # location tokens
    ids = ids.to(device)
    grad_out = torch.randn(cfg["batch"], cfg["seq"], cfg["dim"], generator=g).to(device, DTYPES[cfg["dtype"]])

    def fwd_only():
        with torch.no_grad():
            fwd(ids)
    row["fwd_ms"] = common.try_measure(lambda: common.time_ms(fwd_only, **opts), errors, f"{variant}/fwd")

    def one_backward(out):
        out.backward(grad_out, retain_graph=True)

    def bwd_ms():
        out = fwd(ids)
        return common.time_ms(lambda: one_backward(out), grad_to_none=params, **opts)
    row["bwd_ms"] = common.try_measure(bwd_ms, errors, f"{variant}/bwd")

    def peak():
        out = fwd(ids)
        for p in params:
            p.grad = None
        return peak_bytes(lambda: one_backward(out), device) / 2**20
    row["bwd_peak_mib"] = common.try_measure(peak, errors, f"{variant}/peak")
    row["grad_mib"] = sum(p.grad.nbytes for p in params if p.grad is not None) / 2**20
    row["grad_shape"] = "x".join(str(s) for p in params if p.grad is not None for s in p.grad.shape)
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small vocabulary and batch (harness check)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--variants", default="dense_mask,torch_ref,triton")
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--name", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = common.cuda_ok()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if on_gpu else "cpu"
    cfg = (dict(vocab=1000 + 16, dim=64, rows=16, batch=4, seq=77) if args.tiny
           else dict(vocab=49408 + 16, dim=768, rows=16, batch=64, seq=77))
    cfg["dtype"] = args.dtype
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms if args.rep_ms is not None else (100 if on_gpu else 1500))
    errors: list[str] = []
    rows = []
    for variant in args.variants.split(","):
        row = bench_variant(variant, cfg, device, errors, opts)
        rows.append(row)
        print(f"{variant:>11}: fwd {row['fwd_ms']:.4g} ms  bwd {row['bwd_ms']:.4g} ms  "
              f"bwd peak {row['bwd_peak_mib']:.4g} MiB  grads {row['grad_mib']:.4g} MiB", flush=True)
    dense = next((r for r in rows if r["variant"] == "dense_mask"), None)
    for r in rows:
        r["bwd_speedup_vs_dense"] = dense["bwd_ms"] / r["bwd_ms"] if dense and r["bwd_ms"] == r["bwd_ms"] else NAN
        r["peak_ratio_vs_dense"] = (r["bwd_peak_mib"] / dense["bwd_peak_mib"]
                                    if dense and dense["bwd_peak_mib"] and r["bwd_peak_mib"] == r["bwd_peak_mib"]
                                    else NAN)
    env = common.environment()
    config = {**cfg, "device": device, "timing": opts,
              "peak_method": "torch.cuda.max_memory_allocated" if on_gpu
              else "torch.profiler memory events (torch CPU allocator), peak above start of backward"}
    notes = ["bwd time includes the gradient masking for dense_mask and fresh .grad allocation each step "
             "(set_to_none), as a training step would",
             "on CPU the triton row runs in the Triton interpreter: its time is not a speed number"]
    cols = ["variant", "fwd_ms", "bwd_ms", "bwd_peak_mib", "grad_mib", "grad_shape", "bwd_speedup_vs_dense",
            "peak_ratio_vs_dense"]
    stem = args.name or ("loc_embedding" + ("_tiny" if args.tiny else "") + ("_gpu" if on_gpu else "_cpu"))
    md = common.write_results(stem, args.out, env, config, rows, [("backward", rows, cols)], errors, notes)
    print()
    print(common.markdown_table(rows, cols))
    print(f"\nwritten: {md} (+ .json, .csv); {len(errors)} failure(s) recorded as NaN")
    return 0


if __name__ == "__main__":
    sys.exit(main())
