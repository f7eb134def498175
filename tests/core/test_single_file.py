"""Single-file export in the original Stable Diffusion key layout: the key mapping round trip is exact, the file
loads in plain diffusers (``from_single_file`` with a local, weightless config folder; nothing fetched) with the
source's weights, location rows included, and samples the same image; models the format cannot hold are refused."""
from __future__ import annotations

import dataclasses
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
from geomerase.core.models import MODEL_SIZES, ModelConfig, build_random
from geomerase.core.single_file import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, export_single_file, from_original,
                                        read_single_file, to_original, write_pipeline_config)
from geomerase.core.text_embedding import install_location_embedding

NEGATIVE = "qr code <l0> <l5> <l15>"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_sd_dir, tmp_path_factory):
    """A latent model with distinctive ("trained") location rows, its single file and its config folder."""
    model = ModelConfig(pretrained=str(tiny_sd_dir), grid=4).build()
    emb = install_location_embedding(model.text_encoder, model.loc_token_ids)
    with torch.no_grad():
        emb.loc_rows.copy_(torch.randn(emb.loc_rows.shape, generator=torch.Generator().manual_seed(1)))
    out = tmp_path_factory.mktemp("single")
    path = export_single_file(model, out / "model.safetensors")
    config = write_pipeline_config(model, out / "config")
    return model, path, config, emb.loc_rows.detach().clone()


def _source_image(model, scheduler_config) -> torch.Tensor:
    """``(1, 3, R, R)`` in [0, 1]: the source model's components in a diffusers pipeline, DDIM, 3 steps, seed 7."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _sample(pipe)


def _sample(pipe) -> torch.Tensor:
    return pipe("a red ring", negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(7), output_type="pt").images


def _state(model):
    return {"unet": model.unet.state_dict(), "vae": model.vae.state_dict(),
            "text_encoder": model.text_encoder.state_dict()}


def test_key_mapping_round_trip_is_exact(exported):
    model, path, _, rows = exported
    src = _state(model)
    flat = to_original(src["unet"], src["vae"], src["text_encoder"], model.unet.config, model.vae.config)
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) for k in flat)
    assert len(flat) == sum(len(sd) for sd in src.values())  # no two keys collapsed
    saved = load_file(str(path))
    assert set(saved) == set(flat)
    for back in (from_original(flat, model.unet.config, model.vae.config),
                 read_single_file(path, model.unet.config, model.vae.config)):
        for part, sd in src.items():
            assert set(back[part]) == set(sd), part  # nothing left over either way
            for k, v in sd.items():
                assert back[part][k].dtype == v.dtype and torch.equal(back[part][k], v), (part, k)
    table = saved[TEXT_PREFIX + "embeddings.token_embedding.weight"]
    assert table.shape[0] == len(model.tokenizer)  # the enlarged vocabulary
    assert torch.equal(table[model.loc_token_ids], rows)
    attn = saved[VAE_PREFIX + "encoder.mid.attn_1.q.weight"]
    assert attn.shape[2:] == (1, 1)  # 1x1 conv, as in the original files
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["geomerase"])["grid"] == 4


def test_sd15_shaped_keys_are_the_original_names():
    """At SD-1.5's real shapes (meta tensors, nothing allocated) the names match the published layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = MODEL_SIZES["sd15"]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae)
    flat = to_original(unet.state_dict(), vae.state_dict(), {}, unet.config, vae.config)
    assert sum(k.startswith(UNET_PREFIX) for k in flat) == 686 and sum(k.startswith(VAE_PREFIX) for k in flat) == 248
    for name in ("input_blocks.3.0.op.weight", "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                 "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_in.weight",
                 "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.11.0.emb_layers.1.bias",
                 "time_embed.2.weight", "out.2.bias"):
        assert UNET_PREFIX + name in flat, name
    for name in ("decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                 "encoder.down.3.block.1.conv2.weight", "decoder.mid.attn_1.proj_out.weight", "post_quant_conv.bias"):
        assert VAE_PREFIX + name in flat, name


def test_plain_diffusers_loads_the_file_and_samples_the_same_image(exported):
    model, path, config, _ = exported
    from diffusers import StableDiffusionPipeline  # the loading path below imports no geomerase

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    src = _state(model)
    for part in ("unet", "vae", "text_encoder"):
        loaded = getattr(pipe, part).state_dict()
        assert set(loaded) == set(src[part]), part
        for k, v in src[part].items():
            assert torch.equal(loaded[k], v), (part, k)
    ids = pipe.tokenizer(NEGATIVE).input_ids
    assert ids == model.tokenizer(NEGATIVE).input_ids and ids[3:6] == [model.loc_token_ids[i] for i in (0, 5, 15)]
    ours = _source_image(model, pipe.scheduler.config)
    assert ours.shape == (1, 3, model.resolution, model.resolution) and ours.std() > 0.01
    torch.testing.assert_close(_sample(pipe), ours, rtol=0, atol=1e-4)


# Run in a fresh interpreter with the hub switched off: only diffusers is imported, nothing can be fetched.
_PLAIN = textwrap.dedent('''
    import sys, torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    path, config, out, negative = sys.argv[1:]
    pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True)
    image = pipe("a red ring", negative_prompt=negative, num_inference_steps=3, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert not any(m.startswith("geomerase") for m in sys.modules)
    save_file({"image": image.contiguous()}, out)
''')


def test_a_fresh_interpreter_without_geomerase_samples_the_same_image(exported, tmp_path):
    model, path, config, _ = exported
    out = tmp_path / "image.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _PLAIN, str(path), str(config), str(out), NEGATIVE], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    ours = _source_image(model, json.loads((config / "scheduler" / "scheduler_config.json").read_text()))
    torch.testing.assert_close(load_file(str(out))["image"], ours, rtol=0, atol=1e-4)


def test_geomerase_sample_takes_the_single_file_and_draws_what_the_model_draws(exported, tmp_path):
    import numpy as np
    from PIL import Image

    from geomerase.core.models import load_model
    from geomerase.core.single_file import single_file_folder

    model, path, config, rows = exported
    back = load_model(single_file_folder(path, config, tmp_path / "folder"))
    assert back.grid == 4 and back.loc_token_ids == model.loc_token_ids
    assert torch.equal(back.text_encoder.get_input_embeddings().weight[model.loc_token_ids], rows)
    def cli_sample(out, *model_args):
        args = ["sample", *model_args, "--prompt", "a red ring", "--negative", NEGATIVE, "--n", "1", "--seed", "7",
                "--steps", "3", "--guidance-scale", "3.0", "--out", str(tmp_path / out)]
        assert main(args) == 0
        return torch.from_numpy(np.asarray(Image.open(tmp_path / out).convert("RGB"), dtype=np.int16))

    model.save(tmp_path / "source")  # the model the file was written from, as a folder
    single = cli_sample("single.png", "--model", str(path), "--config-dir", str(config))
    source = cli_sample("source.png", "--model", str(tmp_path / "source"))
    assert single.shape == source.shape and (single - source).abs().max() <= 1  # uint8 rounding of <= 1e-4
    args = ["sample", "--model", str(path), "--out", str(tmp_path / "x.png")]
    assert main(args) == 2 and not (tmp_path / "x.png").exists()  # a single file without --config-dir


def test_pixel_space_model_is_refused_before_writing(tmp_path):
    model = build_random("debug", 4)
    with pytest.raises(ValueError, match="pixel space"):
        export_single_file(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="pixel space"):
        write_pipeline_config(model, tmp_path / "config")
    assert list(tmp_path.iterdir()) == []


def test_coordinate_channels_and_unknown_keys_are_refused(exported, tmp_path):
    model, _, _, _ = exported
    with pytest.raises(ValueError, match="2 coordinate input channels"):
        export_single_file(dataclasses.replace(model, coord_channels=2), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="'input_blocks.0.9.weight' has no counterpart"):
        from_original({UNET_PREFIX + "input_blocks.0.9.weight": torch.zeros(1)}, model.unet.config, model.vae.config)


def test_cli_exports_fp16_with_config_and_refuses_pixel_models(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["export", "--format", "single-file", "--grid", "4", "--dtype", "fp16", "--config-dir",
                 str(tmp_path / "config"), str(tiny_sd_dir), str(out)]) == 0
    saved = load_file(str(out))
    assert {v.dtype for v in saved.values()} == {torch.float16}
    assert saved[TEXT_PREFIX + "embeddings.token_embedding.weight"].shape[0] == 49408 + 16
    assert (tmp_path / "config" / "tokenizer").is_dir() and (tmp_path / "config" / "model_index.json").is_file()
    assert main(["export", "--grid", "4", str(tiny_sd_dir), str(tmp_path / "pipe")]) == 0  # default: diffusers folder
    assert json.loads((tmp_path / "pipe" / "geomerase.json").read_text())["grid"] == 4
    assert main(["export", "--dtype", "fp16", str(tiny_sd_dir), str(tmp_path / "pipe2")]) == 2
    build_random("debug", 4).save(tmp_path / "pixel")
    capsys.readouterr()
    assert main(["export", "--format", "single-file", str(tmp_path / "pixel"), str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # transformers' loading bar shares stderr
    assert [line for line in err.splitlines() if "error" in line] == [
        "geomerase export: error: single-file export: model 'debug' works in pixel space (no VAE); "
        "the format needs a latent model with an AutoencoderKL"]
    assert not (tmp_path / "p.safetensors").exists()
