"""Pure-torch reference for the location-token embedding (gather + position add).

The text encoder's input embedding with a few *trainable* rows (the G^2 location
tokens, optionally more) spliced into a frozen vocabulary table. Autograd only
reaches ``train_weight`` (and ``pos_weight`` when it requires grad), so no
vocabulary-sized gradient exists. The Triton kernel in ``loc_embedding.py`` has
the same signature and semantics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loc_embedding_ref(
    input_ids: torch.Tensor,
    frozen_weight: torch.Tensor,
    train_weight: torch.Tensor,
    train_start: int,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed ``input_ids`` with rows ``[train_start, train_start+R)`` taken from ``train_weight``.

    Args:
        input_ids: ``(B, S)`` int64 token ids, each in ``[0, V)``.
        frozen_weight: ``(V, D)`` vocabulary table; never receives a gradient.
        train_weight: ``(R, D)`` trainable rows standing for ids ``train_start .. train_start+R-1``.
        train_start: first vocabulary id that ``train_weight`` replaces.
        pos_weight: ``(P, D)`` position table, ``P >= S``.
        position_ids: optional ``(B, S)`` or ``(1, S)`` int64 positions; ``arange(S)`` when None.

    Returns:
        ``(B, S, D)`` embeddings in ``frozen_weight.dtype``.
    """
    seq = input_ids.shape[-1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
    rows = train_weight.shape[0]
    local = input_ids - train_start
    is_train = (local >= 0) & (local < rows)
    frozen = F.embedding(input_ids, frozen_weight.detach())
    trained = F.embedding(local.clamp(0, max(rows - 1, 0)), train_weight.to(frozen.dtype))
    tok = torch.where(is_train.unsqueeze(-1), trained, frozen)
    return tok + F.embedding(position_ids, pos_weight).to(tok.dtype)
