"""``export_pipeline`` on its own (``test_trainer`` covers export at the end of ``fit``): the trained location rows
land in the exported table, plain diffusers samples the same image as geomerase for a fixed seed, the folder reads
back with ``load_model``, overwrites are atomic, and pixel-space models are refused before anything changes."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from geomerase.core.export import export_pipeline
from geomerase.core.models import ModelConfig, build_random, load_model
from geomerase.core.sampling import SamplerConfig, sample
from geomerase.core.text_embedding import LocationTokenEmbedding, install_location_embedding

NEGATIVE = "qr code <l0> <l5> <l15>"


pytestmark = pytest.mark.usefixtures("one_thread")


def _set_rows(model, seed):
    """Install the location embedding and give it distinctive ("trained") rows; returns (rows, frozen table)."""
    emb = install_location_embedding(model.text_encoder, model.loc_token_ids)
    with torch.no_grad():
        emb.loc_rows.copy_(torch.randn(emb.loc_rows.shape, generator=torch.Generator().manual_seed(seed)))
    return emb.loc_rows.detach().clone(), emb.token_embedding.weight.detach().clone()


@pytest.fixture(scope="module")
def exported(tiny_sd_dir, tmp_path_factory):
    model = ModelConfig(pretrained=str(tiny_sd_dir), grid=4).build()
    rows, table = _set_rows(model, seed=1)
    path = export_pipeline(model, tmp_path_factory.mktemp("export") / "pipe")
    return model, path, rows, table


def test_export_writes_the_trained_rows_and_the_location_tokenizer(exported):
    model, path, rows, table = exported
    loc = model.loc_token_ids
    assert type(model.text_encoder.embeddings) is CLIPTextEmbeddings
    saved = load_file(str(path / "text_encoder" / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embeddings.token_embedding.weight"))
    assert torch.equal(saved[key][loc], rows)
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[loc] = False
    assert torch.equal(saved[key][keep], table[keep])
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    ids = tok(NEGATIVE).input_ids
    assert ids == model.tokenizer(NEGATIVE).input_ids
    assert [loc[0], loc[5], loc[15]] == ids[3:6]  # each location token is one id
    index = json.loads((path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["safety_checker"] == [None, None]
    assert json.loads((path / "geomerase.json").read_text())["grid"] == 4
    assert not [p.name for p in path.parent.iterdir() if p.name != "pipe"]  # no temp folder left


def test_plain_diffusers_samples_the_same_image_as_geomerase(exported):
    model, path, _, _ = exported
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    # geomerase's DDIM (SamplerConfig.build): no clipping inside the scheduler, no alpha-one final step
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    steps, scale, seed = 3, 3.0, 7
    theirs = pipe("a red ring", negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=scale,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images  # [0, 1]
    ours = sample(model, ["a red ring"], negatives=[NEGATIVE], seeds=[seed],
                  cfg=SamplerConfig(steps=steps, guidance_scale=scale))  # [-1, 1]
    assert theirs.shape == ours.shape == (1, 3, model.resolution, model.resolution)
    torch.testing.assert_close(theirs, (ours + 1) / 2, rtol=0, atol=1e-5)
    # The negative prompt's location rows are the trained ones in both (the prediction depends on them).
    ids = model.tokenize([NEGATIVE])
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], model.encode_text(ids), rtol=0, atol=1e-5)


def test_load_model_reads_the_exported_folder_as_is(exported):
    model, path, rows, _ = exported
    back = load_model(path)  # grid from geomerase.json
    assert (back.grid, back.space, back.resolution, len(back.tokenizer)) == (4, "latent", 16, len(model.tokenizer))
    table = back.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[back.loc_token_ids], rows)  # not re-initialised as new tokens would be
    assert torch.equal(table, model.text_encoder.get_input_embeddings().weight)
    for (k, v), w in zip(back.unet.state_dict().items(), model.unet.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="trained with grid 4"):
        load_model(path, grid=3)


def test_export_replaces_an_existing_folder(tiny_sd_dir, tmp_path):
    model = load_model(tiny_sd_dir, grid=4)
    _set_rows(model, seed=2)
    path = export_pipeline(model, tmp_path / "pipe")
    rows, _ = _set_rows(model, seed=3)  # install again on the stock module, new rows
    assert export_pipeline(model, tmp_path / "pipe") == path
    saved = load_file(str(path / "text_encoder" / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embeddings.token_embedding.weight"))
    assert torch.equal(saved[key][model.loc_token_ids], rows)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # the old copy and the temp folder are gone


def test_pixel_space_model_is_refused_untouched(tmp_path):
    model = build_random("debug", 4)
    emb = install_location_embedding(model.text_encoder, model.loc_token_ids)
    with pytest.raises(ValueError, match="pixel space"):
        export_pipeline(model, tmp_path / "pipe")
    assert list(tmp_path.iterdir()) == []
    assert model.text_encoder.embeddings is emb  # still installed
    assert isinstance(emb, LocationTokenEmbedding)
