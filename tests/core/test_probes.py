"""The binding probes measure what they claim: checked on models whose answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from geomerase.core.models import build_random
from geomerase.core.tokenizer import location_token_ids
from geomerase.core.probes import cell_masks, conditioning_paths, random_cell_sets, tag_localisation


def _rigged(model, behaviour: str):
    """Replace the text encoder and UNet by functions whose tag response is known.

    The "text states" carry which location tokens the caption names; the "UNet" moves x0 by
    +1 in exactly those cells ("bound"), everywhere when any is named ("global"), or not at all.
    """
    grid = model.grid
    loc_ids = torch.tensor(location_token_ids(model.tokenizer, grid))

    def encode_text(ids):
        named = (ids[:, :, None] == loc_ids[None, None]).any(1).float()  # (B, G^2)
        states = torch.zeros(ids.shape[0], 77, grid * grid)
        states[:, 0] = named
        return states

    def denoise(x, t, cond, unet=None):
        named = cond[:, 0]
        if behaviour == "bound":
            bump = cell_masks([named[i].nonzero().flatten().tolist() for i in range(len(named))], grid, x.shape[-1])
        elif behaviour == "global":
            bump = named.amax(1).view(-1, 1, 1, 1).expand(-1, 1, x.shape[-2], x.shape[-1])
        else:
            bump = torch.zeros(x.shape[0], 1, x.shape[-2], x.shape[-1])
        ac = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        # v-prediction: x0 = sqrt(ac) x - sqrt(1 - ac) v, so v = -bump / sqrt(1 - ac) shifts x0 by +bump
        return -bump.expand_as(x) / (1 - ac).sqrt()

    model.encode_text = encode_text
    model.denoise = denoise
    return model


@pytest.mark.parametrize("behaviour", ["bound", "global", "ignored"])
def test_tag_localisation_tells_bound_global_and_ignored_tags_apart(behaviour):
    m = _rigged(build_random("tiny", grid=4), behaviour)
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    cells = random_cell_sets(6, 4, seed=1)
    res = tag_localisation(m, images, ["a red circle"] * 6, "qr code", cells, timesteps=(300, 900))
    for row in res.values():
        if behaviour == "bound":
            assert row["in"] == pytest.approx(1.0, rel=1e-4) and row["out"] == pytest.approx(0.0, abs=1e-8)
            assert row["ratio"] == math.inf
        elif behaviour == "global":
            assert row["in"] == pytest.approx(1.0, rel=1e-4) and row["out"] == pytest.approx(1.0, rel=1e-4)
            assert row["ratio"] == pytest.approx(1.0, rel=1e-4)
        else:
            assert row["in"] == 0.0 and row["out"] == 0.0 and math.isnan(row["ratio"])


def test_random_cell_sets_are_adjacent_and_in_range():
    for cs in random_cell_sets(50, 4, seed=3):
        assert 1 <= len(cs) <= 4 and all(0 <= c < 16 for c in cs)
        rows, cols = {c // 4 for c in cs}, {c % 4 for c in cs}
        assert max(rows) - min(rows) <= 1 and max(cols) - min(cols) <= 1
    with pytest.raises(ValueError, match="lengths"):
        tag_localisation(build_random("debug", grid=4), torch.zeros(2, 3, 16, 16), ["a"], "qr code", [[0], [1]])


def test_conditioning_paths_restores_the_unet_and_needs_a_pooled_path():
    m = build_random("tiny", grid=4)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    res = conditioning_paths(m, images, ["a red circle on a blue background"] * 3, timesteps=(900,))
    row = res[900]
    assert set(row) == {"both", "neither", "pool_only", "xattn_only"} and all(math.isfinite(v) for v in row.values())
    assert row["both"] != row["neither"]  # a random model still reacts to its caption
    assert "forward" not in vars(m.unet.add_embedding)  # the monkeypatch is undone
    with pytest.raises(ValueError, match="pooled-text"):
        conditioning_paths(build_random("tiny-xattn", grid=4), images, ["a"] * 3)
