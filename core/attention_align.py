"""Cross-attention alignment: an auxiliary loss that binds location tokens and concept names to their cells.

The denoising loss teaches ``qr code <l3> <l7>`` only through what the code looks like in the picture;
nothing says *which* image positions those tokens should act on. In the demo's fine-tunes that left the
tokens meaning "a QR code" far more than "here": asked for ``qr code <cells>``, two thirds of the cells the
model drew were outside the asked ones (``benchmarks/results/demo_cpu/NOTES.md``, "Binding probes").

This loss supervises the cross-attention maps directly, in the form of TokenCompose's token-level
grounding term (Wang et al., CVPR 2024): for a token ``j`` with a target region ``R_j`` and a
cross-attention layer with query pixels ``p``, let ``a_j(p)`` be the probability (heads averaged) with which
pixel ``p`` attends to ``j``; the token's share inside its region is
``s_j = sum_{p in R_j} a_j(p) / sum_p a_j(p)`` and the loss is ``mean_j (1 - s_j)^2`` over the
supervised tokens of the batch, averaged over layers.

Targets come from the caption itself: a location token ``<lk>`` targets cell ``k``; the concept-name
tokens right before a run of location tokens (back to the previous comma or the start) target the union
of that run's cells. Every other token is unsupervised, so plain captions add nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from geomerase.core.attention import DispatchAttnProcessor

MAX_NAME_TOKENS = 4
"""Longest concept name supervised (tokens before a run of location tokens); longer runs of words are
caption text, not a concept phrase without a separating comma."""


def boundary_ids(tokenizer) -> list[int]:
    """Token ids that end a concept name when walking back from its location tokens: the start, end
    and padding tokens and the comma that joins caption phrases."""
    return [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            *tokenizer(",", add_special_tokens=False).input_ids]


@dataclass
class AlignmentTargets:
    """``region``: ``(B, S, G, G)`` bool, the cells token ``s`` of caption ``b`` should attend to;
    ``selected``: ``(B, S)`` bool, the tokens that are supervised (``S`` = token positions, 77)."""

    region: torch.Tensor
    selected: torch.Tensor


def alignment_targets(ids: torch.Tensor, loc_ids: Sequence[int], grid: int,
                      boundary_ids: Sequence[int]) -> AlignmentTargets:
    """The target cells of every token of ``ids`` ``(B, S)`` int64.

    ``loc_ids[k]`` is the id of ``<lk>``; ``boundary_ids`` (:func:`boundary_ids`) end a concept name when
    walking back from its location tokens.
    """
    b, s = ids.shape
    region = torch.zeros(b, s, grid * grid, dtype=torch.bool)
    selected = torch.zeros(b, s, dtype=torch.bool)
    cell_of = {int(t): k for k, t in enumerate(loc_ids)}
    stop = {int(t) for t in boundary_ids}
    for row, seq in enumerate(ids.tolist()):
        i = 0
        while i < s:
            if seq[i] not in cell_of:
                i += 1
                continue
            start = i
            while i < s and seq[i] in cell_of:
                region[row, i, cell_of[seq[i]]] = True
                i += 1
            union = region[row, start:i].any(0)
            selected[row, start:i] = True
            j = start - 1
            while j >= 0 and start - j <= MAX_NAME_TOKENS and seq[j] not in stop and seq[j] not in cell_of:
                region[row, j] = union
                selected[row, j] = True
                j -= 1
    return AlignmentTargets(region.view(b, s, grid, grid), selected)


def alignment_loss(probs: Sequence[torch.Tensor], targets: AlignmentTargets) -> torch.Tensor:
    """Mean over layers of ``mean_j (1 - s_j)^2`` (module docstring).

    Args:
        probs: per cross-attention layer, ``(B, H, Q, S)`` attention probabilities of ``Q = h*w`` square
            query grids (row-major pixels) over ``S`` tokens.
        targets: from :func:`alignment_targets`, on any device.

    Returns:
        Scalar float32; zero (without a graph) when no token is supervised or nothing was recorded.
    """
    if not probs or not bool(targets.selected.any()):
        return torch.zeros((), device=probs[0].device if probs else "cpu")
    sel = targets.selected.to(probs[0].device)
    cells = targets.region.to(probs[0].device).float().flatten(0, 1).unsqueeze(1)  # (B*S, 1, G, G)
    losses = []
    for p in probs:
        side = int(round(p.shape[2] ** 0.5))
        if side * side != p.shape[2]:
            raise ValueError(f"cross-attention over {p.shape[2]} queries: not a square grid")
        # area resampling: exact nearest-cell membership when G divides the side, cell fractions otherwise
        region = F.interpolate(cells, size=(side, side), mode="area").view(*sel.shape, side * side)
        a = p.float().mean(1).transpose(1, 2)  # (B, S, Q)
        a, region = a[sel], region[sel]
        share = (a * region).sum(-1) / a.sum(-1).clamp_min(1e-12)
        losses.append((1.0 - share).pow(2).mean())
    return torch.stack(losses).mean()


@contextlib.contextmanager
def recorded_cross_attention(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention of ``unet`` that reads text states appends its ``(B, H, Q, S)``
    probabilities to the yielded list (computed explicitly, in the math form; other attentions keep their
    backend). The UNet's own processors are back in place afterwards, whatever happens inside."""
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"{type(unet).__name__} has no diffusers attention processors to record")
    before = unet.attn_processors
    record: list[torch.Tensor] = []
    unet.set_attn_processor({name: DispatchAttnProcessor(getattr(proc, "backend", "sdpa"), record=record)
                             for name, proc in before.items()})
    try:
        yield record
    finally:
        unet.set_attn_processor(before)
