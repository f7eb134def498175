"""The model bundle (``core/diffusion_model.py``): image <-> model space, coordinate planes, the folder's
stored resolution and the seeded vocabulary rows."""
from __future__ import annotations

import json

import pytest
import torch

from geomerase.core.diffusion_model import META_FILE, seeded_vocab_rows, stored_resolution, with_coords
from geomerase.core.models import build_random, load_model


def test_tiny_space_to_depth_round_trip():
    m = build_random("tiny", grid=4)
    assert m.patch == 2 and m.sample_shape == (12, 16, 16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = m.to_model_space(x)
    assert z.shape == (2, 12, 16, 16)
    torch.testing.assert_close(m.to_images(z), x)


def test_coordinate_planes_reach_the_unet_and_survive_save_load(tmp_path):
    m = build_random("tiny-coord", grid=4)
    assert m.coord_channels == 2 and m.unet.config.in_channels == 14 and m.sample_shape == (12, 16, 16)
    x = torch.randn(2, 12, 16, 16)
    xc = with_coords(x, 2)
    assert xc.shape == (2, 14, 16, 16)
    torch.testing.assert_close(xc[:, :12], x)
    assert xc[0, 12, 0, 0] == -1 and xc[0, 12, 0, -1] == 1 and xc[0, 13, -1, 0] == 1  # x across, y down
    t = torch.tensor([5, 500])
    cond = m.encode_text(m.tokenize(["a red circle", "qr code <l5>"]))
    with torch.no_grad():
        y = m.denoise(x, t, cond)
        # the planes are an input, not a constant: the same x at other coordinates predicts differently
        y_flipped = m.unet(torch.cat([x, -xc[:, 12:]], 1), t, cond).sample
    assert y.shape == x.shape and not torch.allclose(y, y_flipped)
    m.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "geomerase.json").read_text())["coord_channels"] == 2
    m2 = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(m2.denoise(x, t, cond), y)
    meta = json.loads((tmp_path / "ckpt" / "geomerase.json").read_text())
    meta["coord_channels"] = 0
    (tmp_path / "ckpt" / "geomerase.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="coord_channels"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="0 or 2"):
        with_coords(x, 3)


def test_stored_resolution_reads_configs_only(tmp_path):
    m = build_random("tiny", grid=0)
    m.save(tmp_path / "m")
    assert stored_resolution(tmp_path / "m") == m.resolution == 32
    (tmp_path / "m" / META_FILE).unlink()  # a plain diffusers folder: unet.sample_size x the VAE's factor (none)
    assert stored_resolution(tmp_path / "m") == m.unet.config.sample_size
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        stored_resolution(tmp_path / "empty")


def test_seeded_vocab_rows_depend_on_the_seed_alone():
    a, b = seeded_vocab_rows(100, 8, 3), seeded_vocab_rows(100, 8, 3)
    assert a.shape == (100, 8) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, seeded_vocab_rows(100, 8, 4))
    assert abs(a.std().item() - 0.02) < 0.005
