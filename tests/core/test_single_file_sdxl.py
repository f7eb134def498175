"""Single-file export of SDXL in Stability's original layout (``sd_xl_base_1.0.safetensors``): the key mapping round
trip is exact for the UNet, VAE and both text encoders; at SDXL base's real shapes the names are the published ones;
plain diffusers (``StableDiffusionXLPipeline.from_single_file`` with the weightless config folder, nothing fetched, no
geomerase imported) loads the source's weights and samples geomerase's own image; ``geomerase sample`` takes the file;
the CLI writes fp16."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from geomerase.cli import main
from geomerase.core.models import MODEL_SIZES, load_model
from geomerase.core.sampling import SamplerConfig, sample
from geomerase.core.sdxl import SDXLModel
from geomerase.core.single_file import (UNET_PREFIX, VAE_PREFIX, export_single_file, from_original,
                                        read_single_file, single_file_folder, to_original, write_pipeline_config)
from geomerase.core.single_file_sdxl import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, open_clip_from_original
from geomerase.core.text_embedding import install_location_embedding

NEGATIVE = "qr code <l0> <l5> <l15>"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
STEPS, SCALE, SEED = 3, 3.0, 7


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_sdxl_dir, tmp_path_factory):
    """An SDXL model with distinctive ("trained") location rows in both encoders, its single file and config folder."""
    model = load_model(tiny_sdxl_dir, grid=4)
    rows = []
    loc_ids = (model.loc_token_ids, model.loc_token_ids_2)
    for seed, (_, _, text_encoder), ids in zip((1, 2), model.text_encoders, loc_ids):
        emb = install_location_embedding(text_encoder, ids)
        with torch.no_grad():
            emb.loc_rows.copy_(torch.randn(emb.loc_rows.shape, generator=torch.Generator().manual_seed(seed)))
        rows.append(emb.loc_rows.detach().clone())
    out = tmp_path_factory.mktemp("single_sdxl")
    path = export_single_file(model, out / "model.safetensors")
    config = write_pipeline_config(model, out / "config")
    return model, path, config, rows


def _state(model) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(model, part).state_dict() for part in PARTS}


def _ours(model) -> torch.Tensor:
    """geomerase's sampler (DDIM), ``(1, 3, R, R)`` mapped to [0, 1]."""
    image = sample(model, ["a red ring"], negatives=[NEGATIVE], seeds=[SEED],
                   cfg=SamplerConfig(steps=STEPS, guidance_scale=SCALE))
    return (image + 1) / 2


def test_key_mapping_round_trip_is_exact(exported):
    model, path, _, (rows, rows_2) = exported
    src = _state(model)
    flat = to_original(src["unet"], src["vae"], src["text_encoder"], model.unet.config, model.vae.config,
                       src["text_encoder_2"])
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)) for k in flat)
    n_layers = model.text_encoder_2.config.num_hidden_layers
    assert len(flat) == sum(len(sd) for sd in src.values()) - 4 * n_layers  # per layer q/k/v (6 tensors) -> in_proj (2)
    saved = load_file(str(path))
    assert set(saved) == set(flat)
    for back in (from_original(flat, model.unet.config, model.vae.config),
                 read_single_file(path, model.unet.config, model.vae.config)):
        assert set(back) == set(PARTS)
        for part, sd in src.items():
            assert set(back[part]) == set(sd), part  # nothing left over either way
            for k, v in sd.items():
                assert back[part][k].dtype == v.dtype and torch.equal(back[part][k], v), (part, k)
    for table, tokenizer, ids, loc in ((saved[CLIP_L_PREFIX + "embeddings.token_embedding.weight"], model.tokenizer,
                                        model.loc_token_ids, rows),
                                       (saved[OPEN_CLIP_PREFIX + "token_embedding.weight"], model.tokenizer_2,
                                        model.loc_token_ids_2, rows_2)):
        assert table.shape[0] == len(tokenizer) == 49408 + 16  # the enlarged vocabulary
        assert torch.equal(table[ids], loc)
    te2 = src["text_encoder_2"]
    layer = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(saved[OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([te2[layer + p + "_proj.weight"] for p in "qkv"]))
    assert torch.equal(saved[OPEN_CLIP_PREFIX + "text_projection"], te2["text_projection.weight"].T)
    assert saved[OPEN_CLIP_PREFIX + "text_projection"].shape == (64, 32)  # (width, projection), OpenCLIP's order
    assert torch.equal(saved[UNET_PREFIX + "label_emb.0.2.bias"], src["unet"]["add_embedding.linear_2.bias"])
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["geomerase"])["grid"] == 4


def test_sdxl_base_shaped_keys_are_the_original_names():
    """At SDXL base's real shapes (meta tensors, nothing allocated) the names and counts match the published file
    (which adds ``conditioner.embedders.1.model.logit_scale``, dropped on reading)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(**MODEL_SIZES["sd15"].vae)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
    flat = to_original(unet.state_dict(), vae.state_dict(), clip_l.state_dict(), unet.config, vae.config,
                       clip_g.state_dict())
    counts = [sum(k.startswith(p) for k in flat) for p in (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)]
    assert counts == [1680, 248, 196, 389] and len(flat) == sum(counts)
    assert flat[UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 2816)
    for name in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.3.0.op.weight",
                 "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                 "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", "input_blocks.7.0.skip_connection.weight",
                 "middle_block.1.transformer_blocks.9.attn1.to_q.weight", "output_blocks.0.1.proj_out.weight",
                 "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.8.0.out_layers.3.bias",
                 "label_emb.0.2.bias", "time_embed.0.weight"):
        assert UNET_PREFIX + name in flat, name
    assert not any(k.startswith(UNET_PREFIX + "input_blocks.1.1.") for k in flat)  # no attention in the first level
    assert not any(k.startswith(UNET_PREFIX + "input_blocks.9.") for k in flat)  # no downsampler after the last
    for name in ("positional_embedding", "text_projection", "ln_final.weight",
                 "transformer.resblocks.31.attn.in_proj_bias", "transformer.resblocks.0.mlp.c_proj.weight"):
        assert OPEN_CLIP_PREFIX + name in flat, name
    assert flat[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert CLIP_L_PREFIX + "encoder.layers.11.self_attn.q_proj.weight" in flat


def test_plain_diffusers_loads_the_file_with_the_sources_weights_and_tokenizers(exported):
    model, path, config, _ = exported
    from diffusers import StableDiffusionXLPipeline  # the loading path below imports no geomerase

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    src = _state(model)
    for part in PARTS:
        loaded = getattr(pipe, part).state_dict()
        assert set(loaded) == set(src[part]), part
        for k, v in src[part].items():
            assert torch.equal(loaded[k], v), (part, k)
    for tokenizer, ours, loc in ((pipe.tokenizer, model.tokenizer, model.loc_token_ids),
                                 (pipe.tokenizer_2, model.tokenizer_2, model.loc_token_ids_2)):
        ids = tokenizer(NEGATIVE).input_ids
        assert ids == ours(NEGATIVE).input_ids and ids[3:6] == [loc[i] for i in (0, 5, 15)]
    assert pipe.config.force_zeros_for_empty_prompt is False


# Run in a fresh interpreter with the hub switched off: only diffusers is imported, nothing can be fetched.
_PLAIN = textwrap.dedent('''
    import sys, torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    path, config, out, negative, steps, scale, seed, res = sys.argv[1:]
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=config, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    image = pipe("a red ring", negative_prompt=negative, height=int(res), width=int(res),
                 num_inference_steps=int(steps), guidance_scale=float(scale),
                 generator=torch.Generator().manual_seed(int(seed)), output_type="pt").images
    assert not any(m.startswith("geomerase") for m in sys.modules)
    save_file({"image": image.contiguous()}, out)
''')


def test_a_fresh_interpreter_without_geomerase_samples_geomerase_image(exported, tmp_path):
    model, path, config, _ = exported
    out = tmp_path / "image.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(path), str(config), str(out), NEGATIVE, str(STEPS), str(SCALE), str(SEED), str(model.resolution)]
    subprocess.run([sys.executable, "-c", _PLAIN, *args], check=True, env=env, cwd=tmp_path, capture_output=True)
    theirs, ours = load_file(str(out))["image"], _ours(model)
    assert theirs.shape == ours.shape == (1, 3, 16, 16) and ours.std() > 0.01
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_geomerase_sample_takes_the_single_file_and_draws_what_the_model_draws(exported, tmp_path):
    import numpy as np
    from PIL import Image

    model, path, config, (rows, rows_2) = exported
    back = load_model(single_file_folder(path, config, tmp_path / "folder"))
    assert isinstance(back, SDXLModel) and back.grid == 4 and back.loc_token_ids_2 == model.loc_token_ids_2
    assert torch.equal(back.text_encoder.get_input_embeddings().weight[model.loc_token_ids], rows)
    assert torch.equal(back.text_encoder_2.get_input_embeddings().weight[model.loc_token_ids_2], rows_2)
    torch.testing.assert_close(_ours(back), _ours(model), rtol=0, atol=1e-6)

    def cli_sample(out, *model_args):
        args = ["sample", *model_args, "--prompt", "a red ring", "--negative", NEGATIVE, "--n", "1", "--seed",
                str(SEED), "--steps", str(STEPS), "--guidance-scale", str(SCALE), "--out", str(tmp_path / out)]
        assert main(args) == 0
        return torch.from_numpy(np.asarray(Image.open(tmp_path / out).convert("RGB"), dtype=np.int16))

    model.save(tmp_path / "source")  # the model the file was written from, as a folder
    single = cli_sample("single.png", "--model", str(path), "--config-dir", str(config))
    source = cli_sample("source.png", "--model", str(tmp_path / "source"))
    assert single.shape == source.shape and (single - source).abs().max() <= 1  # uint8 rounding
    (tmp_path / "partial").mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):  # an SDXL config folder without _2
        (tmp_path / "partial" / sub).symlink_to(config / sub)
    with pytest.raises(FileNotFoundError, match="missing 'text_encoder_2/'"):
        single_file_folder(path, tmp_path / "partial", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_exports_fp16_with_the_sdxl_config(tiny_sdxl_dir, tmp_path):
    out, config = tmp_path / "m.safetensors", tmp_path / "config"
    assert main(["export", "--format", "single-file", "--grid", "4", "--dtype", "fp16", "--config-dir", str(config),
                 str(tiny_sdxl_dir), str(out)]) == 0
    saved = load_file(str(out))
    assert {v.dtype for v in saved.values()} == {torch.float16}
    assert saved[CLIP_L_PREFIX + "embeddings.token_embedding.weight"].shape == (49408 + 16, 32)
    assert saved[OPEN_CLIP_PREFIX + "token_embedding.weight"].shape == (49408 + 16, 64)
    assert json.loads((config / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler"):
        assert (config / sub).is_dir(), sub
    assert not list(config.rglob("*.safetensors")) and not list(config.rglob("*.bin"))  # weightless


def test_mismatched_text_encoders_and_unknown_open_clip_keys_are_refused(exported):
    model, _, _, _ = exported
    src = _state(model)
    with pytest.raises(ValueError, match="goes with text_encoder_2"):
        to_original(src["unet"], src["vae"], src["text_encoder"], model.unet.config, model.vae.config)
    with pytest.raises(ValueError, match="'transformer.resblocks.0.attn.q_proj.weight' has no counterpart"):
        open_clip_from_original({"transformer.resblocks.0.attn.q_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not 3 x width"):
        open_clip_from_original({"transformer.resblocks.0.attn.in_proj_bias": torch.zeros(4)})
    assert open_clip_from_original({"logit_scale": torch.zeros(())}) == {}
