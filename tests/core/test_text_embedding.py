"""The location-token embedding: a drop-in for ``CLIPTextEmbeddings`` whose only trainable rows are a separate
``(R, D)`` parameter. Forward is a lookup in the merged table, gradients reach only those rows, the frozen table
never changes, and state dicts keep the stock CLIP layout (save, load, uninstall round trips)."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from geomerase.core.text_embedding import (LocationTokenEmbedding, install_location_embedding,
                                           uninstall_location_embedding)

V, D, P, START, R = 60, 16, 20, 50, 6
LOC = list(range(START, START + R))
# The Triton kernel on CPU tensors needs the interpreter (tests/conftest.py sets it where CUDA is absent).
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors reach the Triton kernel only under TRITON_INTERPRET=1"))
BACKENDS = ["torch", TRITON]


def _encoder(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=P, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).requires_grad_(False).eval()


def _ids(seed=1, bsz=3, seq=10):
    """Random ids with location ids at the edges of the range, repeated, and their neighbours; rows
    ``START+3 ..`` never occur."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, START, (bsz, seq), generator=g)
    ids[0, 1:6] = torch.tensor([START, START + 1, START + 2, START, START - 1])
    ids[1, 2:4] = torch.tensor([START + 2, START + 1])
    return ids


def _train_rows(emb, seed=5):
    with torch.no_grad():
        emb.loc_rows.copy_(torch.randn(R, D, generator=torch.Generator().manual_seed(seed)))
    return emb.loc_rows.detach().clone()


def _merged(table, rows):
    merged = table.detach().clone()
    merged[START:START + R] = rows
    return merged


def test_rejects_unknown_backends_and_non_contiguous_rows():
    te = _encoder()
    tok, pos = te.embeddings.token_embedding, te.embeddings.position_embedding
    with pytest.raises(ValueError, match="unknown location-embedding backend 'cuda'"):
        LocationTokenEmbedding(tok, pos, LOC, backend="cuda")
    for bad in ([], [START, START + 2]):
        with pytest.raises(ValueError, match="contiguous"):
            LocationTokenEmbedding(tok, pos, bad)
    emb = LocationTokenEmbedding(tok, pos, [START + 2, START, START + 1])  # order does not matter
    assert (emb.start, emb.rows) == (START, 3)


def test_install_leaves_only_the_location_rows_trainable():
    te = _encoder()
    table = te.embeddings.token_embedding.weight.detach().clone()
    emb = install_location_embedding(te, LOC)
    assert te.embeddings is emb and isinstance(emb, LocationTokenEmbedding)
    trainable = [p for p in te.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is emb.loc_rows and emb.loc_rows.shape == (R, D)
    assert torch.equal(emb.loc_rows, table[START:START + R])
    assert emb.loc_rows.data_ptr() != emb.token_embedding.weight.data_ptr()  # own storage, not a view
    assert not emb.token_embedding.weight.requires_grad and not emb.position_embedding.weight.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_a_lookup_in_the_merged_table(backend):
    te = _encoder()
    emb = install_location_embedding(te, LOC, backend)
    rows = _train_rows(emb)
    ids = _ids()
    merged = _merged(emb.token_embedding.weight, rows)
    pos_w = emb.position_embedding.weight
    out = emb(ids)
    assert out.shape == (3, 10, D) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, merged) + pos_w[:10])
    position_ids = torch.randint(0, P, (3, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(emb(ids, position_ids=position_ids), F.embedding(ids, merged) + F.embedding(position_ids, pos_w))
    with pytest.raises(NotImplementedError, match="input_ids"):
        emb(inputs_embeds=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reaches_only_the_location_rows_and_equals_the_dense_one(backend):
    """Through the whole encoder: ``loc_rows.grad`` is the dense table gradient's location rows (the
    textual-inversion pattern it replaces), and nothing else gets a gradient."""
    te = _encoder()
    stock = copy.deepcopy(te)
    emb = install_location_embedding(te, LOC, backend)
    rows = _train_rows(emb)
    with torch.no_grad():
        stock.embeddings.token_embedding.weight.copy_(_merged(emb.token_embedding.weight, rows))
    stock.embeddings.token_embedding.weight.requires_grad_(True)
    ids = _ids()
    weights = torch.randn(3, 10, D, generator=torch.Generator().manual_seed(3))
    (te(ids).last_hidden_state * weights).sum().backward()
    (stock(ids).last_hidden_state * weights).sum().backward()
    assert emb.token_embedding.weight.grad is None and emb.position_embedding.weight.grad is None
    assert all(p.grad is None for n, p in te.named_parameters() if n != "embeddings.loc_rows")
    grad = emb.loc_rows.grad
    assert grad.shape == (R, D)
    assert torch.count_nonzero(grad[3:]) == 0 and torch.count_nonzero(grad[:3]) == 3 * D  # rows 3.. never occur
    dense = stock.embeddings.token_embedding.weight.grad
    torch.testing.assert_close(grad, dense[START:START + R], rtol=1e-5, atol=1e-7)


def test_training_moves_the_location_rows_and_nothing_else():
    te = _encoder()
    emb = install_location_embedding(te, LOC)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    frozen_table = emb.token_embedding.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in te.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    target = torch.randn(3, 10, D, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        F.mse_loss(te(_ids()).last_hidden_state, target).backward()
        opt.step()
        opt.zero_grad()
    after = te.state_dict()
    key = "embeddings.token_embedding.weight"
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    keep = torch.ones(V, dtype=torch.bool)
    keep[LOC] = False
    assert torch.equal(after[key][keep], before[key][keep])
    assert not torch.equal(after[key][LOC], before[key][LOC])
    assert torch.equal(after[key][LOC], emb.loc_rows.detach())  # the state dict carries the trained rows
    assert torch.equal(emb.token_embedding.weight, frozen_table)  # the frozen table itself never changed


def test_state_dict_has_the_stock_layout_and_loads_into_a_plain_clip_model():
    te = _encoder()
    stock_keys = set(_encoder().state_dict())
    emb = install_location_embedding(te, LOC)
    rows = _train_rows(emb)
    table = emb.token_embedding.weight.detach().clone()
    sd = te.state_dict()
    assert set(sd) == stock_keys  # no "loc_rows" key
    assert torch.equal(sd["embeddings.token_embedding.weight"], _merged(table, rows))
    assert torch.equal(emb.token_embedding.weight, table)  # saving did not write into the module
    plain = _encoder(seed=9)
    plain.load_state_dict(sd, strict=True)
    ids = _ids()
    torch.testing.assert_close(plain(ids).last_hidden_state, te(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_loading_a_stock_state_dict_splits_the_location_rows_out():
    te = _encoder()
    emb = install_location_embedding(te, LOC)
    param = emb.loc_rows
    source = _encoder(seed=3)
    te.load_state_dict(source.state_dict(), strict=True)
    src_table = source.embeddings.token_embedding.weight
    assert emb.loc_rows is param and param.requires_grad  # loaded in place: an optimizer still holds it
    assert torch.equal(emb.loc_rows, src_table[START:START + R])
    assert torch.equal(emb.token_embedding.weight, src_table)
    ids = _ids()
    torch.testing.assert_close(te(ids).last_hidden_state, source(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_install_is_idempotent_and_uninstall_merges_the_rows_back():
    te = _encoder()
    emb = install_location_embedding(te, LOC)
    rows = _train_rows(emb)
    assert install_location_embedding(te, LOC) is emb and torch.equal(emb.loc_rows, rows)  # not reset
    ids = _ids()
    out = te(ids).last_hidden_state
    uninstall_location_embedding(te)
    assert type(te.embeddings) is CLIPTextEmbeddings
    assert torch.equal(te.embeddings.token_embedding.weight[START:START + R], rows)
    torch.testing.assert_close(te(ids).last_hidden_state, out, rtol=0, atol=1e-6)
    stock = te.embeddings
    uninstall_location_embedding(te)  # already stock: nothing to do
    assert te.embeddings is stock
    again = install_location_embedding(te, LOC)  # a new module starts from the merged (trained) rows
    assert again is not emb and torch.equal(again.loc_rows, rows)


def test_install_reaches_a_nested_text_model():
    """transformers before 5 nests the transformer under ``.text_model``."""
    class Nested(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner
            self.config = inner.config

    inner = _encoder()
    outer = Nested(inner)
    emb = install_location_embedding(outer, LOC)
    assert inner.embeddings is emb
    uninstall_location_embedding(outer)
    assert type(inner.embeddings) is CLIPTextEmbeddings
