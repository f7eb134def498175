"""``torch.library`` registration of the Triton flash attention (for ``torch.compile`` graphs).

A custom op pair (forward returning ``(o, lse)``, backward returning ``(dq, dk, dv)``) with
fake implementations, so the compiler can trace through the kernel without running it;
autograd is registered on the forward op. Calls go through the same launch plans as
:func:`~geomerase.kernels.attention.flash_attention`, and the backward runs under the
:func:`~geomerase.kernels.attention.kernel_overrides` of its forward.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from .attention import _flash_bwd, _flash_fwd, _prepare, kernel_overrides
from .attention_plan import _OVERRIDES

_LIBRARY_OP = None


def register_flash_attention_op(name: str = "geomerase::flash_attention"):
    """Register the kernel as a ``torch.library`` custom op (for ``torch.compile`` graphs).

    Returns a callable ``op(q, k, v, scale)`` backed by ``torch.ops``; idempotent.
    """
    global _LIBRARY_OP
    if _LIBRARY_OP is not None:
        return _LIBRARY_OP

    @torch.library.custom_op(name + "_fwd", mutates_args=())
    def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _flash_fwd(q, k, v, scale)

    @_fwd.register_fake
    def _(q, k, v, scale):
        return torch.empty_like(q), q.new_empty((q.shape[0] * q.shape[1], q.shape[2]), dtype=torch.float32)

    @torch.library.custom_op(name + "_bwd", mutates_args=())
    def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _flash_bwd(do, q, k, v, o, lse, scale)

    @_bwd.register_fake
    def _(do, q, k, v, o, lse, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.overrides = _OVERRIDES.get()

    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        with kernel_overrides(**asdict(ctx.overrides)):
            dq, dk, dv = _bwd(do.contiguous(), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    _fwd.register_autograd(backward, setup_context=setup_context)

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        q, k, v, scale, _ = _prepare(q, k, v, scale)
        return _fwd(q, k, v, scale)[0]

    _LIBRARY_OP = op
    return op
