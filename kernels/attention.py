"""Triton flash attention (forward + backward, non-causal) for Stable-Diffusion UNet shapes.

Layout is SDPA's: ``q`` is ``(B, H, Sq, D)``, ``k``/``v`` are ``(B, H, Sk, D)``; any strides
with a unit last-dim stride are read in place, so the transposed views diffusers builds from
``(B, S, H*D)`` cost no copy. fp16/bf16/fp32 inputs, fp32 accumulation, the base-2
log-sum-exp of every query row is kept for the backward.

Design choices (the why):

* Head dims that are not powers of two (40, 80, 160 in SD-1.x/2.x) are split into two
  power-of-two column chunks ``DA + DB`` (32+16, 64+16, 128+32) that are loaded with
  ``tl.arange`` + mask, instead of padding the whole head to the next power of two. For
  hd 160 that is 160 columns of tensor-core work instead of 256.
* ``exp2`` with the softmax scale pre-multiplied by log2(e): one FMA per score.
* Strides are passed with an alignment hint (``ALIGN``), so a 40-wide head (row stride 40,
  which the JIT does not mark as divisible by 16) is still read with 16-byte pipelined loads.
* Backward has two atomic-free schemes. ``two_kernel``: one kernel owns a query block and
  sweeps the keys for dQ, computing ``delta = rowsum(dO * O)`` for its rows in its prologue
  (no separate launch); the other, launched after it, owns a key block and sweeps the
  queries for dK/dV. ``fused``, when all keys fit one tile (cross-attention's 77 keys at
  hd <= 80): one program holds every key, computes P and dS once per query block
  and writes dQ, dK and dV; five matmuls instead of seven, one launch instead of two. On a
  GPU with tuning on, a plan times both on its first backward and keeps the faster of
  those whose gradients agree with ``two_kernel`` (a miscompiled variant never wins).
* ``torch.library`` registration for ``torch.compile``: ``attention_op.py``.
* Host cost: the small SD shapes take ~10 µs of GPU work, so the Python side matters. All
  per-shape launch metadata (head chunks, alignment, split, strides, grid, the chosen
  config) lives in a plan keyed by shapes/strides/dtype/device; after a plan's first call
  (which may autotune) each launch calls the plain JIT function with frozen arguments,
  without the autotuner/heuristics wrappers, and no driver query is on the hot path.
* With 77 keys the key-block grids leave most SMs idle: the query sweep is then split over
  ``n_split`` programs writing fp32 partials, which one small kernel sums and casts.

Tests and benchmarks pin a path (a query split, a tile config, a backward scheme) with
``with kernel_overrides(...)``; a plan keeps the overrides it was built under, so the backward
of a forward run inside the block follows them wherever autograd runs it.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .attention_plan import (LOG2E, KernelOverrides, _autotune_enabled, _BwdPlan, _first_launch, _fwd_plan,
                             _FwdPlan, _unit_last_stride, kernel_overrides, launch_count)

__all__ = ["FlashAttentionFunction", "KernelOverrides", "flash_attention", "flash_attention_with_lse",
           "kernel_overrides", "launch_count"]


# --------------------------------------------------------------------------- entry points
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               plan: _FwdPlan | None = None):
    """Returns ``o`` (q's shape, strides and dtype) and ``lse`` ``(B*H, Sq)`` fp32, base 2."""
    if plan is None:
        plan = _fwd_plan(q, k, v)
    o = torch.empty_like(q)  # keeps q's layout, e.g. the (B, S, H, D) memory diffusers uses
    lse = torch.empty(plan.lse_shape, device=q.device, dtype=torch.float32)
    args = (q, k, v, o, lse, *plan.strides, plan.heads, plan.seq_q, plan.seq_k, scale * LOG2E)
    if plan.launch is None:
        plan.launch = _first_launch("fwd", plan.hd_class, plan.grid, plan.seq_q, plan.seq_k, args, plan.const,
                                    plan.overrides.config_index)
    else:
        plan.launch(*args)
    return o, lse


def _launch(bp: _BwdPlan, kind: str, hd_class: str, grid_of: Callable[[dict], tuple[int, int]],
            args: tuple, const: dict[str, Any]) -> None:
    """Launch kernel ``kind`` through its frozen entry in ``bp.launches``, making it on first use."""
    launch = bp.launches.get(kind)
    if launch is None:
        bp.launches[kind] = _first_launch(kind, hd_class, grid_of, bp.seq_q, bp.seq_k, args, const, bp.pinned)
    else:
        launch(*args)


def _run_bwd(bp: _BwdPlan, scheme: str, do, q, k, v, o, lse, scale: float, hd_class: str):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if scheme in bp.part_shape:
        part = torch.empty(bp.part_shape[scheme], device=q.device, dtype=torch.float32)
        dk_out, dv_out = part[0], part[1]
    else:
        dk_out, dv_out = dk, dv
    dims = (bp.heads, bp.seq_q, bp.seq_k, scale * LOG2E, scale)
    if scheme == "fused":
        # one kernel: dQ and delta come from the same pass (DELTA is unused: lse stands in)
        args = (q, k, v, o, do, lse, lse, dq, dk_out, dv_out, *bp.kv_strides["fused"], *dims)
        _launch(bp, "fused", hd_class, bp.grid_fused, args, bp.kv_const["fused"])
    else:
        delta = torch.empty((bp.bh, bp.seq_q), device=q.device, dtype=torch.float32)
        # dQ first: it writes delta, which the dK/dV kernel reads (same stream, so ordered)
        args = (q, k, v, o, do, lse, delta, dq, *bp.dq_strides, *dims)
        _launch(bp, "dq", hd_class, bp.grid_q, args, bp.const)
        args = (q, k, v, o, do, lse, delta, dq, dk_out, dv_out, *bp.kv_strides["two_kernel"], *dims)
        _launch(bp, "dkdv", hd_class, bp.grid_kv, args, bp.kv_const["two_kernel"])
    if scheme in bp.sums:
        bp.sums[scheme](dk_out, dv_out, dk, dv, *bp.sum_strides[scheme], bp.heads, bp.seq_k)
    return dq, dk, dv


def _time_schemes(device: torch.device) -> bool:
    # Measuring needs a GPU and is part of tuning: tests (tuning off) take the first candidate.
    return device.type == "cuda" and _autotune_enabled()


def _scheme_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _flash_bwd(do, q, k, v, o, lse, scale: float, plan: _FwdPlan | None = None):
    """Gradients ``(dq, dk, dv)`` in the dtypes and layouts of ``q, k, v``."""
    if plan is None:
        plan = _fwd_plan(q, k, v)
    do = _unit_last_stride(do)
    bp = plan.bwd.get(do.stride())
    if bp is None:
        bp = plan.bwd[do.stride()] = _BwdPlan(plan, q, k, v, do)
    if bp.scheme is None:
        bp.scheme, grads = _choose_scheme(bp, do, q, k, v, o, lse, scale, plan.hd_class)
        if grads is not None:  # the chosen scheme already ran on these inputs while timing
            return grads
    return _run_bwd(bp, bp.scheme, do, q, k, v, o, lse, scale, plan.hd_class)


# Relative (Frobenius) gradient difference beyond which two schemes disagree. Both round
# P and dS to the input dtype the same way and accumulate in fp32, differing only in
# summation order (~1e-3 in bf16); a miscompiled variant is off by O(0.1-1).
_SCHEME_AGREE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _choose_scheme(bp: _BwdPlan, do, q, k, v, o, lse, scale: float, hd_class: str):
    """A plan's first backward: with timing (a GPU with tuning on), run every candidate (each
    tunes its own tiles on its first call), check it against ``two_kernel`` and keep the
    fastest that agrees; otherwise the first candidate. Returns ``(scheme, its gradients
    when it ran here, else None)``."""
    if len(bp.candidates) == 1 or not _time_schemes(q.device):
        return bp.candidates[0], None
    grads = {}
    for name in bp.candidates:
        grads[name] = _run_bwd(bp, name, do, q, k, v, o, lse, scale, hd_class)
        bp.scheme_ms[name] = _scheme_ms(lambda name=name: _run_bwd(bp, name, do, q, k, v, o, lse, scale, hd_class))
    base, tol = grads["two_kernel"], _SCHEME_AGREE[q.dtype]
    for name in bp.candidates:
        diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                   for a, b in zip(grads[name], base))
        if diff > tol:  # a wrong kernel must not win on speed: drop it, loudly
            warnings.warn(f"flash_attention: the {name!r} backward disagrees with 'two_kernel' by {diff:.2e} "
                          f"(relative, > {tol:g}) for q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype}; not used",
                          RuntimeWarning, stacklevel=3)
            bp.scheme_ms[name] = float("inf")
    best = min(bp.scheme_ms, key=bp.scheme_ms.get)
    return best, grads[best]


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, o`` and the fp32 log-sum-exp for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, plan: _FwdPlan | None = None):
        if plan is None:  # fixed now: the backward follows this forward's plan and overrides
            plan = _fwd_plan(q, k, v)
        o, lse = _flash_fwd(q, k, v, scale, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.scale, ctx.plan)
        return dq, dk, dv, None, None


def _prepare(q, k, v, scale):
    plan = _fwd_plan(q, k, v)
    if plan.copy_q or plan.copy_k or plan.copy_v:  # rare: a non-unit last stride
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    scale = plan.default_scale if scale is None else float(scale)
    return q, k, v, scale, plan


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention, differentiable in ``q, k, v``.

    Args:
        q: ``(B, H, Sq, D)`` fp16/bf16/fp32, ``D <= 256``, any strides.
        k, v: ``(B, H, Sk, D)``, same dtype and device as ``q``.
        scale: softmax scale; ``1/sqrt(D)`` when None (as SDPA).

    Returns:
        ``(B, H, Sq, D)`` in ``q.dtype``, with ``q``'s memory layout.
    """
    q, k, v, scale, plan = _prepare(q, k, v, scale)
    if plan.copy_q or plan.copy_k or plan.copy_v:
        plan = None  # the plan describes the raw inputs; the copies get their own
    return FlashAttentionFunction.apply(q, k, v, scale, plan)


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: output and the natural-log log-sum-exp ``(B, H, Sq)`` fp32 of the scaled scores."""
    q, k, v, scale, _ = _prepare(q, k, v, scale)
    with torch.no_grad():
        o, lse = _flash_fwd(q, k, v, scale)
    return o, (lse / LOG2E).view(q.shape[0], q.shape[1], q.shape[2])
