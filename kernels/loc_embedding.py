"""Triton kernel for the text encoder's input embedding with trainable location-token rows.

Same signature and semantics as ``loc_embedding_ref``: token rows come from the frozen
``(V, D)`` vocabulary table, except ids ``[train_start, train_start + R)`` that come from the
trainable ``(R, D)`` table, and a position row is added, all in one pass over the output.

The point of the kernel is the backward. The textual-inversion pattern (a full
``nn.Embedding`` with ``requires_grad`` and a gradient mask) materialises a ``(V, D)``
gradient, 152 MB in fp32 at CLIP size (49,424 x 768), per step. Here the backward
scatters the incoming gradient straight into a dense ``(R, D)`` fp32 buffer (and a
``(P, D)`` one for the position table if it trains), so the frozen table never has a
gradient: ``frozen_weight.grad`` stays None.

Accumulation uses fp32 atomics, so sums over repeated tokens/positions are exact to fp32
rounding but their order (hence the last bits) is not deterministic on a GPU.
"""
from __future__ import annotations

import sys
import types

import torch
import triton
import triton.language as tl


@triton.jit
def _loc_embed_fwd_kernel(
    IDS, FW, TW, PW, POS, OUT,
    n_tokens, seq_len, vocab, rows, train_start,
    stride_fw, stride_tw, stride_pw, stride_pb, stride_ps,
    DIM: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < n_tokens
    d_ok = offs_d < DIM
    ids = tl.load(IDS + offs_t, mask=t_ok, other=0)
    local = ids - train_start
    is_train = (local >= 0) & (local < rows)
    # Only the row each token needs is read; out-of-range ids read nothing (zeros).
    fw_ok = t_ok & (~is_train) & (ids >= 0) & (ids < vocab)
    tw_ok = t_ok & is_train
    frozen = tl.load(FW + ids[:, None].to(tl.int64) * stride_fw + offs_d[None, :],
                     mask=fw_ok[:, None] & d_ok[None, :], other=0.0)
    trained = tl.load(TW + local[:, None] * stride_tw + offs_d[None, :],
                      mask=tw_ok[:, None] & d_ok[None, :], other=0.0)
    out_ty = OUT.dtype.element_ty
    # Round each term to the output dtype first, as the reference's .to() casts do, so the
    # low-precision result matches it bit for bit.
    tok = tl.where(is_train[:, None], trained.to(out_ty).to(tl.float32), frozen.to(tl.float32))
    s = offs_t % seq_len
    if HAS_POS:
        b = offs_t // seq_len
        pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=t_ok, other=0)
    else:
        pos = s
    prow = tl.load(PW + pos[:, None].to(tl.int64) * stride_pw + offs_d[None, :],
                   mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    res = tok + prow.to(out_ty).to(tl.float32)
    tl.store(OUT + offs_t[:, None].to(tl.int64) * DIM + offs_d[None, :], res.to(out_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _loc_embed_bwd_kernel(
    IDS, POS, GRAD, DTW, DPW,
    n_tokens, seq_len, rows, train_start,
    stride_g, stride_pb, stride_ps,
    DIM: tl.constexpr, HAS_POS: tl.constexpr, POS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < n_tokens
    d_ok = offs_d < DIM
    ids = tl.load(IDS + offs_t, mask=t_ok, other=0)
    local = ids - train_start
    is_train = t_ok & (local >= 0) & (local < rows)
    g = tl.load(GRAD + offs_t[:, None].to(tl.int64) * stride_g + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    # Frozen-row tokens are simply dropped: no vocabulary-sized buffer exists to receive them.
    tl.atomic_add(DTW + local[:, None] * DIM + offs_d[None, :], g,
                  mask=is_train[:, None] & d_ok[None, :])
    if POS_GRAD:
        s = offs_t % seq_len
        if HAS_POS:
            b = offs_t // seq_len
            pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=t_ok, other=0)
        else:
            pos = s
        tl.atomic_add(DPW + pos[:, None] * DIM + offs_d[None, :], g, mask=t_ok[:, None] & d_ok[None, :])


def _blocks(dim: int) -> tuple[int, int]:
    block_d = min(256, triton.next_power_of_2(dim))
    return 16, block_d


def _position_strides(position_ids: torch.Tensor | None, bsz: int, seq: int):
    if position_ids is None:
        return None, 0, 0
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, bsz):
        raise ValueError(f"position_ids must be (B, S) or (1, S) with S={seq}, got {tuple(position_ids.shape)}")
    position_ids = position_ids.to(torch.int64)
    stride_pb = 0 if position_ids.shape[0] == 1 else position_ids.stride(0)
    return position_ids, stride_pb, position_ids.stride(1)


class LocEmbeddingFunction(torch.autograd.Function):
    """Fused gather + position add; the backward fills only ``(R, D)`` (and ``(P, D)``) grads."""

    @staticmethod
    def forward(ctx, input_ids, frozen_weight, train_weight, train_start: int, pos_weight, position_ids):
        bsz, seq = input_ids.shape
        vocab, dim = frozen_weight.shape
        rows = train_weight.shape[0]
        ids = input_ids.contiguous().view(-1).to(torch.int64)
        fw = frozen_weight if frozen_weight.stride(-1) == 1 else frozen_weight.contiguous()
        tw = train_weight if train_weight.stride(-1) == 1 else train_weight.contiguous()
        pw = pos_weight if pos_weight.stride(-1) == 1 else pos_weight.contiguous()
        pos, stride_pb, stride_ps = _position_strides(position_ids, bsz, seq)
        out = torch.empty((bsz, seq, dim), device=frozen_weight.device, dtype=frozen_weight.dtype)
        block_t, block_d = _blocks(dim)
        grid = (triton.cdiv(bsz * seq, block_t), triton.cdiv(dim, block_d))
        _loc_embed_fwd_kernel[grid](
            ids, fw, tw if rows > 0 else fw, pw, pos if pos is not None else ids, out,
            bsz * seq, seq, vocab, rows, int(train_start),
            fw.stride(0), tw.stride(0) if rows > 0 else 0, pw.stride(0), stride_pb, stride_ps,
            DIM=dim, HAS_POS=pos is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        ctx.save_for_backward(ids, pos if pos is not None else ids)
        ctx.meta = (bsz, seq, dim, rows, int(train_start), pos is not None, stride_pb, stride_ps)
        ctx.tw_dtype, ctx.pw_shape, ctx.pw_dtype = train_weight.dtype, pos_weight.shape, pos_weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, pos = ctx.saved_tensors
        bsz, seq, dim, rows, train_start, has_pos, stride_pb, stride_ps = ctx.meta
        need_tw = ctx.needs_input_grad[2]
        need_pw = ctx.needs_input_grad[4]
        if not (need_tw or need_pw):
            return None, None, None, None, None, None
        grad = grad_out.reshape(bsz * seq, dim)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dtw = torch.zeros((max(rows, 1), dim), device=grad.device, dtype=torch.float32)
        dpw = torch.zeros(ctx.pw_shape, device=grad.device, dtype=torch.float32) if need_pw else dtw
        block_t, block_d = _blocks(dim)
        grid = (triton.cdiv(bsz * seq, block_t), triton.cdiv(dim, block_d))
        _loc_embed_bwd_kernel[grid](
            ids, pos, grad, dtw, dpw,
            bsz * seq, seq, rows, train_start,
            grad.stride(0), stride_pb, stride_ps,
            DIM=dim, HAS_POS=has_pos, POS_GRAD=need_pw, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        dtrain = dtw[:rows].to(ctx.tw_dtype) if need_tw else None
        dpos = dpw.to(ctx.pw_dtype) if need_pw else None
        return None, None, dtrain, None, dpos, None


def loc_embedding(
    input_ids: torch.Tensor,
    frozen_weight: torch.Tensor,
    train_weight: torch.Tensor,
    train_start: int,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed ``input_ids`` with rows ``[train_start, train_start+R)`` taken from ``train_weight``.

    Args:
        input_ids: ``(B, S)`` integer token ids in ``[0, V)`` (ids outside embed as zeros).
        frozen_weight: ``(V, D)`` vocabulary table; never receives a gradient.
        train_weight: ``(R, D)`` trainable rows for ids ``train_start .. train_start+R-1``.
        train_start: first vocabulary id that ``train_weight`` replaces.
        pos_weight: ``(P, D)`` position table, ``P >= S``; gets a gradient if it requires one.
        position_ids: optional ``(B, S)`` or ``(1, S)`` positions; ``arange(S)`` when None.

    Returns:
        ``(B, S, D)`` in ``frozen_weight.dtype``; differentiable in ``train_weight`` and
        ``pos_weight`` only, with an ``(R, D)`` gradient (never ``(V, D)``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got {tuple(input_ids.shape)}")
    if frozen_weight.dim() != 2 or train_weight.dim() != 2 or pos_weight.dim() != 2:
        raise ValueError("frozen_weight, train_weight and pos_weight must be 2-D tables")
    dim = frozen_weight.shape[1]
    if train_weight.shape[1] != dim or pos_weight.shape[1] != dim:
        raise ValueError(f"embedding widths differ: {frozen_weight.shape[1]}, {train_weight.shape[1]}, "
                         f"{pos_weight.shape[1]}")
    if pos_weight.shape[0] < input_ids.shape[1] and position_ids is None:
        raise ValueError(f"pos_weight has {pos_weight.shape[0]} rows, fewer than the {input_ids.shape[1]} positions")
    return LocEmbeddingFunction.apply(input_ids, frozen_weight, train_weight, int(train_start), pos_weight,
                                      position_ids)


class _CallableModule(types.ModuleType):
    """Importing ``geomerase.kernels.loc_embedding`` directly makes Python bind the package
    attribute of that name to this module, shadowing the function of the same name; a
    callable module keeps ``geomerase.kernels.loc_embedding(...)`` working either way."""

    def __call__(self, *args, **kwargs):
        return loc_embedding(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
