"""Compile every flash-attention kernel config for Hopper (sm_90a) without a GPU.

Triton can lower a kernel all the way to PTX for a named target with no device present;
the ptxas that ships with Triton then reports registers, spills and stack. This shows,
before any device time is spent, whether each autotune candidate compiles, whether the dots
became ``wgmma`` (Hopper tensor-core instructions), whether K/V loads are software-pipelined
(``cp.async``) and 16-byte wide, and which configs spill.

Run:  python -m geomerase.benchmarks.compile_check [--kinds fwd,dkdv,dq,fused] [--hd 40,80,160]
Writes ``compile_check.{json,csv,md}`` under ``--out`` (default benchmarks/results).
Numbers come from the local Triton version; the device may run another (a lead, not a reading).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # lowering needs real JIT functions

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks._bootstrap  # noqa: F401
    from geomerase.benchmarks import common
else:
    from . import common

import torch  # noqa: E402
import triton  # noqa: E402

NAN = float("nan")
PTR_FP32 = {"LSE", "DELTA"}
PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"} | PTR_FP32
FLOAT_ARGS = {"qk_scale", "sm_scale"}


def _ptxas() -> str | None:
    base = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # the newest bundled ptxas: the PTX ISA Triton emits can be newer than the plain one reads
    for name in ("ptxas-blackwell", "ptxas"):
        if (base / name).exists():
            return str(base / name)
    return None


def lower(kind: str, head_dim: int, cfg, dtype: str, even: bool, row_stride: int, n_split: int = 1) -> dict:
    """Compile one kernel variant for sm_90a; returns counts from its PTX and ptxas' report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from geomerase.kernels import attention_plan as A

    fn = A._KERNELS[kind]
    _, meta = A._head_meta(head_dim, {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    partial = kind in ("dkdv", "fused") and n_split > 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in PTR_FP32 or (partial and name in ("DK", "DV")):
            sig[name] = "*fp32"
        elif name in PTRS:
            sig[name] = "*" + dtype
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # what the JIT's own specialisation would see: 16-aligned pointers, strides
        # divisible by 16 only when they are (a 40-wide row is not)
        if sig[name].startswith("*") or (name.startswith("stride") and name[-1] in "bh") or \
                (name.startswith("stride") and name[-1] in "mn" and row_stride % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    block_n, even_n = cfg.kwargs.get("BLOCK_N"), even
    if kind == "fused":  # every key in one tile: SD-1.5's cross-attention, 77 keys
        block_n, even_n = A._fused_block_n(77, head_dim), False
    consts = dict(meta, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=block_n, EVEN_M=even, EVEN_N=even_n,
                  ALIGN=A._align(torch.empty(1, 1, 2, row_stride)) if row_stride else 16)
    if kind in ("dkdv", "fused"):
        consts.update(N_SPLIT=n_split, FUSED=kind == "fused")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = ck.asm["ptx"]
    row = {"compile_s": round(time.time() - t0, 2), "smem_kib": ck.metadata.shared / 1024,
           "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
           "cp_async": ptx.count("cp.async.c"), "ld_v4": ptx.count("ld.global.v4"),
           "ld_b16": ptx.count("ld.global.b16")}
    ptxas = _ptxas()
    row.update(regs=NAN, spill_bytes=NAN)
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            Path(path).write_text(ptx)
            rep = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120).stderr
        m = re.search(r"Used (\d+) registers", rep)
        sp = re.search(r"(\d+) bytes spill stores", rep)
        if m:
            row["regs"] = int(m.group(1))
        if sp:
            row["spill_bytes"] = int(sp.group(1))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="fwd,dkdv,dq,fused")
    ap.add_argument("--hd", default="40,80,160")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--ragged", action="store_true", help="also lower the masked (odd-length) variants")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from geomerase.kernels import attention_plan as A

    rows, errors = [], []
    for kind in args.kinds.split(","):
        for hd in (int(x) for x in args.hd.split(",")):
            hd_class, _ = A._head_meta(hd, torch.bfloat16)
            # (the fused backward has no list for hd classes it does not take)
            for i, cfg in enumerate(A._CONFIGS[kind].get(hd_class, [])):
                for even in ((True, False) if args.ragged else (True,)):
                    # fused: the query range split (fp32 partials) of SD-1.5's cross shapes
                    n_split = 4 if kind == "fused" else 1
                    row = {"kernel": kind, "hd": hd, "cfg": i, "block_m": cfg.kwargs["BLOCK_M"],
                           "block_n": cfg.kwargs.get("BLOCK_N", "all"), "warps": cfg.num_warps,
                           "stages": cfg.num_stages, "even": even}
                    try:
                        row.update(lower(kind, hd, cfg, args.dtype, even, row_stride=hd, n_split=n_split))
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{kind}/hd{hd}/cfg{i}: {type(exc).__name__}: {str(exc)[:300]}")
                        row["error"] = type(exc).__name__
                    rows.append(row)
                    print({k: v for k, v in row.items()}, flush=True)
    cols = ["kernel", "hd", "cfg", "block_m", "block_n", "warps", "stages", "even", "regs", "spill_bytes",
            "smem_kib", "wgmma", "mma_sync", "cp_async", "ld_v4", "ld_b16", "compile_s"]
    env = common.environment()
    md = common.write_results("compile_check", args.out, env, {"target": "cuda sm_90a (offline)",
                                                              "dtype": args.dtype, "ptxas": _ptxas()},
                              rows, [("sm_90a lowering per config", rows, cols)], errors,
                              ["contiguous (B, H, S, D) inputs: row stride = head dim",
                               "cp_async > 0: K/V (or Q/dO) loads are software-pipelined; ld_b16 > 0: 2-byte loads"])
    print(f"written: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
