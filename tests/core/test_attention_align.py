"""Cross-attention alignment: targets read from captions, the loss's values at its extremes, recording that
leaves the UNet's output and processors as they were, and a gradient that reaches the location rows."""
from __future__ import annotations

import pytest
import torch

from geomerase.core.attention import DispatchAttnProcessor
from geomerase.core.attention_align import (AlignmentTargets, alignment_loss, alignment_targets, boundary_ids,
                                            recorded_cross_attention)
from geomerase.core.models import build_random
from geomerase.core.tokenizer import build_tokenizer, location_token_ids


def _targets(captions, grid=4):
    tok = build_tokenizer(grid)
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return tok, ids, alignment_targets(ids, location_token_ids(tok, grid), grid, boundary_ids(tok))


def test_location_tokens_target_their_cells_and_the_name_their_union():
    tok, ids, tg = _targets(["a red circle on a blue field, qr code <l3> <l7>", "qr code <l0>, a square",
                             "a plain scene"])
    words = [tok.convert_ids_to_tokens(r) for r in ids.tolist()]
    sel = [[w for w, s in zip(ws, row) if s] for ws, row in zip(words, tg.selected.tolist())]
    assert sel[0] == ["qr</w>", "code</w>", "<l3>", "<l7>"]
    assert sel[1] == ["qr</w>", "code</w>", "<l0>"]
    assert sel[2] == []  # nothing supervised without location tokens
    cells = tg.region.flatten(2)
    pos = {w: i for i, w in enumerate(words[0])}
    assert cells[0, pos["<l3>"]].nonzero().flatten().tolist() == [3]
    assert cells[0, pos["<l7>"]].nonzero().flatten().tolist() == [7]
    assert cells[0, pos["qr</w>"]].nonzero().flatten().tolist() == [3, 7]
    assert not cells[0, pos["field</w>"]].any()


def test_two_concepts_each_name_targets_its_own_cells():
    tok, ids, tg = _targets(["a scene, watermark <l1> <l2>, text <l12>"])
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    cells = tg.region.flatten(2)[0]
    first, second = words.index(",</w>"), words.index(",</w>", words.index(",</w>") + 1)
    watermark = range(first + 1, words.index("<l1>"))  # "watermark" is several BPE pieces
    assert len(watermark) >= 1
    assert all(cells[i].nonzero().flatten().tolist() == [1, 2] for i in watermark)
    assert cells[words.index("text</w>")].nonzero().flatten().tolist() == [12]
    assert words.index("text</w>") == second + 1
    assert tg.selected[0].sum() == len(watermark) + 2 + 2  # names + location tokens, nothing else
    assert not tg.selected[0, words.index("scene</w>")]


def test_loss_is_zero_inside_and_the_outside_share_squared_when_uniform():
    g, q = 4, 64  # an 8x8 query grid: each cell is 2x2 pixels
    region = torch.zeros(1, 3, g, g, dtype=torch.bool)
    region[0, 1, 0, 0] = True  # token 1 -> cell 0
    selected = torch.tensor([[False, True, False]])
    tg = AlignmentTargets(region, selected)
    inside = torch.zeros(1, 2, q, 3)
    inside[..., 0] = 1.0
    rows = torch.tensor([0, 1, 8, 9])  # the pixels of cell 0
    inside[:, :, rows, 0] = 0.0
    inside[:, :, rows, 1] = 1.0
    assert alignment_loss([inside], tg).item() == pytest.approx(0.0, abs=1e-7)
    uniform = torch.full((1, 2, q, 3), 1 / 3)
    assert alignment_loss([uniform], tg).item() == pytest.approx((1 - 1 / 16) ** 2, rel=1e-6)
    # a 2x2 grid coarser than the 4x4 cells: the region counts by its area share
    coarse = torch.full((1, 2, 4, 3), 1 / 3)
    assert alignment_loss([coarse], tg).item() == pytest.approx((1 - 1 / 16) ** 2, rel=1e-6)
    assert alignment_loss([uniform], AlignmentTargets(region, torch.zeros_like(selected))).item() == 0.0


def test_recording_keeps_output_and_processors_and_reaches_the_location_rows():
    torch.manual_seed(0)
    model = build_random("debug", grid=4, seed=0)
    model.set_attention_backend("sdpa")
    ids = model.tokenize(["a scene, qr code <l5> <l6>", "qr code <l15>"])
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = model.denoise(x, t, model.encode_text(ids))
    before = {k: repr(v) for k, v in model.unet.attn_processors.items()}
    table = model.text_encoder.get_input_embeddings().weight
    with recorded_cross_attention(model.unet) as probs:
        out = model.denoise(x, t, model.encode_text(ids))
    assert {k: repr(v) for k, v in model.unet.attn_processors.items()} == before
    assert all(isinstance(p, DispatchAttnProcessor) and p.record is None for p in model.unet.attn_processors.values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n_cross = sum(1 for n in model.unet.attn_processors if "attn2" in n)
    assert len(probs) == n_cross and n_cross > 0
    assert all(p.shape[0] == 2 and p.shape[-1] == 77 for p in probs)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones_like(probs[0].sum(-1)))
    loss = alignment_loss(probs, alignment_targets(ids, model.loc_token_ids, 4, boundary_ids(model.tokenizer)))
    assert 0.0 < loss.item() < 1.0
    loss.backward()
    rows = table.grad[model.loc_token_ids]
    assert rows[5].abs().sum() > 0 and rows[15].abs().sum() > 0 and rows[0].abs().sum() == 0
