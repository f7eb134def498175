"""A drop-in for ``CLIPTextEmbeddings`` whose only trainable vocabulary rows are the location tokens.

Model removal trains just the G^2 location-token rows of a frozen text encoder.
Training the whole ``(V, D)`` table and masking its gradient (the usual
textual-inversion pattern) materialises a vocabulary-sized gradient and lets
weight decay touch frozen rows; here the trainable rows are their own ``(R, D)``
parameter and the frozen table never requires grad. The state dict keeps the
stock layout (``token_embedding.weight`` holds every row, location rows included),
so checkpoints load into a plain ``CLIPTextModel``.

The gather + position add is dispatched by name: ``torch`` (the pure-torch
reference) or ``triton`` (the fused kernel); model code never imports a kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _embedding_fn(backend: str):
    if backend == "torch":
        from geomerase.kernels.loc_embedding_ref import loc_embedding_ref

        return loc_embedding_ref
    if backend == "triton":
        from geomerase.kernels import loc_embedding

        return loc_embedding
    raise ValueError(f"unknown location-embedding backend {backend!r}; choose 'torch' or 'triton'")


class LocationTokenEmbedding(nn.Module):
    """Token + position embedding with rows ``[start, start+R)`` trainable and the rest frozen.

    Inputs ``input_ids`` ``(B, S)`` int64; output ``(B, S, D)`` in the table's dtype.
    """

    def __init__(self, token_embedding: nn.Embedding, position_embedding: nn.Embedding,
                 trainable_ids: Sequence[int], backend: str = "torch"):
        super().__init__()
        ids = sorted(trainable_ids)
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("trainable ids must be a non-empty contiguous range (location tokens are appended together)")
        self.start = ids[0]
        self.rows = len(ids)
        self.backend = backend
        self._fn = _embedding_fn(backend)
        self.token_embedding = token_embedding
        self.token_embedding.weight.requires_grad_(False)
        self.position_embedding = position_embedding
        self.position_embedding.weight.requires_grad_(False)
        self.loc_rows = nn.Parameter(token_embedding.weight[self.start:self.start + self.rows].detach().clone())
        max_pos = position_embedding.weight.shape[0]
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=False)
        self._register_state_dict_hook(LocationTokenEmbedding._merge_rows_hook)
        self._register_load_state_dict_pre_hook(LocationTokenEmbedding._split_rows_hook, with_module=True)

    @staticmethod
    def _merge_rows_hook(module: "LocationTokenEmbedding", state: dict, prefix: str, local_metadata) -> dict:
        # Save the trained rows inside the stock table: checkpoints stay CLIP-shaped.
        key = prefix + "token_embedding.weight"
        weight = state[key].clone()
        weight[module.start:module.start + module.rows] = state.pop(prefix + "loc_rows").to(weight.dtype)
        state[key] = weight
        return state

    @staticmethod
    def _split_rows_hook(module: "LocationTokenEmbedding", state: dict, prefix: str, *args) -> None:
        key = prefix + "token_embedding.weight"
        if key in state and prefix + "loc_rows" not in state:
            state[prefix + "loc_rows"] = state[key][module.start:module.start + module.rows]

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is not None:
            raise NotImplementedError("LocationTokenEmbedding takes input_ids, not inputs_embeds")
        seq = input_ids.shape[-1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq]
        return self._fn(input_ids, self.token_embedding.weight, self.loc_rows, self.start,
                        self.position_embedding.weight, position_ids)

def _text_transformer(text_encoder: nn.Module) -> nn.Module:
    # transformers 5 flattened CLIPTextModel (no .text_model); older releases nest it.
    return getattr(text_encoder, "text_model", text_encoder)


def install_location_embedding(text_encoder: nn.Module, trainable_ids: Sequence[int],
                               backend: str = "torch") -> LocationTokenEmbedding:
    """Swap the text encoder's ``embeddings`` module for a :class:`LocationTokenEmbedding` (idempotent)."""
    tm = _text_transformer(text_encoder)
    if isinstance(tm.embeddings, LocationTokenEmbedding):
        return tm.embeddings
    old = tm.embeddings
    new = LocationTokenEmbedding(old.token_embedding, old.position_embedding, trainable_ids, backend)
    tm.embeddings = new.to(old.token_embedding.weight.device)
    return tm.embeddings


def uninstall_location_embedding(text_encoder: nn.Module) -> None:
    """Write the trained rows back and restore the stock embedding module."""
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    tm = _text_transformer(text_encoder)
    emb = tm.embeddings
    if not isinstance(emb, LocationTokenEmbedding):
        return
    stock = CLIPTextEmbeddings(text_encoder.config).to(emb.token_embedding.weight.device)
    stock.load_state_dict(emb.state_dict())
    tm.embeddings = stock


def location_rows(text_encoder: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """The current ``(R, D)`` rows of tokens ``ids`` (the trained ones when a
    :class:`LocationTokenEmbedding` is installed), detached, in the table's dtype."""
    emb = _text_transformer(text_encoder).embeddings
    if isinstance(emb, LocationTokenEmbedding):
        idx = torch.as_tensor(list(ids), device=emb.loc_rows.device) - emb.start
        if bool((idx < 0).any()) or bool((idx >= emb.rows).any()):
            raise ValueError("location_rows: ids outside the installed location rows")
        return emb.loc_rows.detach()[idx]
    return emb.token_embedding.weight.detach()[list(ids)]
