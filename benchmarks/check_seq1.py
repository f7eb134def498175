"""GPU-only: shows that length-1 sequences were wrong only through Triton's ``== 1`` specialisation.

Runs hd 160 fp16 at (Sq, Sk) = (130, 1) and (1, 77) twice: with the shipped kernels (sequence
lengths marked ``do_not_specialize``) and with the same Python kernels re-jitted with Triton's
default specialisation (a length of 1 becomes a constexpr). Prints each gradient's error
against an fp32 reference, relative Frobenius norm floored like the tests (rms 0.1).
Run: PYTHONPATH=<farm> GEOMERASE_FLASH_AUTOTUNE=0 python3 benchmarks/check_seq1.py [specialise]
(one variant per process: the specialised one may fault the CUDA context)
"""
import torch
import triton

from geomerase.kernels import attention_plan as A
from geomerase.kernels import flash_attention
from geomerase.kernels.attention_ref import attention_ref


def rel(x, r):
    x, r = x.double(), r.double()
    return ((x - r).norm() / r.norm().clamp_min(0.1 * r.numel() ** 0.5)).item()


def grads(fn, q, k, v, do, dtype=None):
    xs = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*xs, None)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in xs]


def run(label):
    for sq, sk in ((130, 1), (1, 77)):
        g = torch.Generator().manual_seed(sq * 1000 + sk)
        q, k, v = (torch.randn(2, 3, s, 160, generator=g).cuda().half() for s in (sq, sk, sk))
        do = torch.randn(2, 3, sq, 160, generator=g).cuda().half()
        ref = grads(attention_ref, q, k, v, do, torch.float32)
        got = grads(flash_attention, q, k, v, do)
        errs = " ".join(f"{n}={rel(a, b):.2e}" for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref))
        print(f"{label:14s} sq={sq:3d} sk={sk:3d} {errs}", flush=True)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["specialise"]:  # Triton's default: a length of 1 becomes a constexpr
        A._KERNELS.update({kind: triton.jit(fn.fn) for kind, fn in A._KERNELS.items()})  # in place: the plans read it
        A._launcher_cache.clear()
        run("specialise==1")
    else:
        run("no-specialise")
