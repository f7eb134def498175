"""Model registry, checkpoint layout, and loading a real Stable Diffusion from a local folder."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from geomerase.core.models import MODEL_SIZES, ModelConfig, build_random, load_model
from geomerase.core.tokenizer import CLIP_VOCAB_SIZE


def test_registry_has_cpu_and_sd_sizes():
    assert {"debug", "tiny", "sd15"} <= set(MODEL_SIZES)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig(size="huge").build()


def test_random_model_has_location_rows_and_saves_in_diffusers_layout(tmp_path):
    m = build_random("debug", grid=3)
    assert m.text_encoder.get_input_embeddings().weight.shape[0] == CLIP_VOCAB_SIZE + 9
    assert m.loc_token_ids == list(range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + 9))
    out = m.save(tmp_path / "ckpt")
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json", "geomerase.json"]:
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # atomic: no temp folder left
    # diffusers loads the UNet on its own.
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert unet.config.sample_size == 16
    back = load_model(out)
    assert back.grid == 3 and back.space == "pixel"
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    ids = back.tokenize(["a red circle, qr code <l4>"])
    with torch.no_grad():
        a = m.unet(x, t, m.encode_text(ids)).sample
        b = back.unet(x, t, back.encode_text(ids)).sample
    torch.testing.assert_close(a, b)


def test_load_local_stable_diffusion_folder(tiny_sd_dir, tmp_path):
    assert json.loads((tiny_sd_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    stock = CLIPTextModel.from_pretrained(str(tiny_sd_dir / "text_encoder"), local_files_only=True)
    m = ModelConfig(pretrained=str(tiny_sd_dir), grid=2).build()
    assert m.space == "latent" and m.vae is not None and m.resolution == 16
    emb = m.text_encoder.get_input_embeddings().weight
    assert emb.shape[0] == CLIP_VOCAB_SIZE + 4
    # Pretrained rows are untouched; new rows start near the mean embedding.
    torch.testing.assert_close(emb[:CLIP_VOCAB_SIZE], stock.get_input_embeddings().weight)
    assert torch.isfinite(emb[CLIP_VOCAB_SIZE:]).all()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = m.to_model_space(images)
        assert z.shape == (2, 4, 8, 8)
        out = m.unet(z, torch.tensor([5, 5]), m.encode_text(m.tokenize(["qr code <l0>", ""]))).sample
    assert out.shape == z.shape
    # A geomerase checkpoint of the latent model round-trips with its VAE.
    saved = m.save(tmp_path / "ft")
    back = load_model(saved)
    assert back.vae is not None and back.grid == 2
    with pytest.raises(ValueError, match="grid"):
        load_model(saved, grid=3)


def test_missing_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_model(tmp_path / "half", grid=2)
