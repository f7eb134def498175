"""The offline CLIP tokenizer with location tokens (`core.tokenizer`)."""
from __future__ import annotations


import pytest

from geomerase.core.tokenizer import CLIP_VOCAB_SIZE, build_tokenizer, location_token_ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(4)


def test_clip_ids_match_reference(tok):
    # Ids of CLIP ViT-L/14's tokenizer for these words (start 49406, end 49407).
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tok("Hello world!!").input_ids == [49406, 3306, 1002, 748, 49407]


def test_location_tokens_round_trip(tok):
    ids = location_token_ids(tok, 4)
    assert ids == list(range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + 16))
    text = "a blue field, qr code <l3> <l15>"
    enc = tok(text).input_ids
    assert enc[-3:-1] == [ids[3], ids[15]]
    assert tok.convert_ids_to_tokens(enc[-3:-1]) == ["<l3>", "<l15>"]
    # Glued tokens still split: the added tokens are matched before BPE.
    assert tok("<l3><l15>").input_ids[1:-1] == [ids[3], ids[15]]
    assert tok.decode(enc, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "").replace(",", ",")

