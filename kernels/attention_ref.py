"""Pure-torch attention reference with the same signature as the Triton kernel.

``attention_ref`` is the numerical ground truth for the kernel tests and the fallback the
dispatch in ``core/attention.py`` calls ``math``. It materialises the full ``(Sq, Sk)`` score
matrix, so it is only meant for references and small shapes. The softmax is computed in
fp32 whatever the input dtype, and the result is cast back, which is what a careful
low-precision implementation would do too; tests compare both the kernel and this
reference run in bf16/fp16 against this reference run in fp32 (or fp64).
"""
from __future__ import annotations

import math

import torch


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` unless q, k, v are SDPA-style ``(B, H, S, D)`` tensors.

    Shared by the reference, the Triton kernel and the dispatch so that every backend
    rejects the same inputs with the same message.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, S, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"batch and head dims must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v need the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same head dim, got {q.shape[-1]} and {k.shape[-1]}")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention ``softmax(q k^T * scale) v`` in plain torch ops.

    Args:
        q: ``(B, H, Sq, D)`` floating tensor.
        k: ``(B, H, Sk, D)``, same dtype/device as ``q``.
        v: ``(B, H, Sk, Dv)``.
        scale: softmax scale, ``1/sqrt(D)`` when None (as SDPA).

    Returns:
        ``(B, H, Sq, Dv)`` in ``q.dtype``. Differentiable in ``q, k, v``.
    """
    check_attention_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # The matmuls run in the input dtype (so a bf16 reference carries bf16 rounding), the
    # softmax in at least fp32, as fused kernels do.
    scores = torch.matmul(q, k.transpose(-2, -1))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores.to(acc_dtype) * scale, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Natural-log log-sum-exp of the scaled scores, ``(B, H, Sq)`` in fp64 (or fp32 on devices without it)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    wide = torch.float64 if q.device.type == "cpu" else torch.float32
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-2, -1)) * scale
    return torch.logsumexp(scores, dim=-1)
