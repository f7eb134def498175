"""SDXL: a tiny random SDXL folder (``core.sdxl.write_tiny_sdxl``) loads with the location tokens in both tokenizers and
rows in both encoders; two training steps in each mode change only what the mode trains; the run's exported
``StableDiffusionXLPipeline`` folder samples, in plain diffusers, the image geomerase's sampler samples; the GPU
config loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from geomerase.core.config import load_config
from geomerase.core.export import export_lora
from geomerase.core.lora import LORA_WEIGHTS, base_state_dict, has_lora
from geomerase.core.models import ModelConfig, load_model
from geomerase.core.sampling import SamplerConfig, sample
from geomerase.core.sdxl import SDXLModel
from geomerase.core.trainer import RunConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
NEGATIVE = "qr code <l0> <l5> <l15>"
MODES = ("data-removal", "model-removal", "lora")
LORA = ["train.lora.rank=4", "train.lora.alpha=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_location_tokens_in_both_tokenizers_and_pooling_at_the_end_token(tiny_sdxl_dir):
    model = load_model(tiny_sdxl_dir, grid=4)
    assert isinstance(model, SDXLModel) and (model.space, model.resolution) == ("latent", 16)
    ids = model.tokenize([NEGATIVE, ""])
    assert ids.shape == (2, 2, 77) and ids.dtype == torch.int64
    for row, loc in ((0, model.loc_token_ids), (1, model.loc_token_ids_2)):
        assert ids[0, row, 3:6].tolist() == [loc[0], loc[5], loc[15]]  # one id per location token
    assert ids[1, 1, 2].item() == model.tokenizer_2.pad_token_id != model.tokenizer_2.eos_token_id
    for _, tok, te in model.text_encoders:
        assert len(tok) == te.get_input_embeddings().weight.shape[0] == 49408 + 16
    cond = model.encode_text(ids)
    assert cond.shape == (2, 78, 32 + 64)
    with torch.no_grad():
        out = model.text_encoder_2(ids[:, 1], output_hidden_states=True)
        eos = (ids[:, 1] == model.tokenizer_2.eos_token_id).int().argmax(-1)  # first end token, not a location id
        pooled = model.text_encoder_2.text_projection(out.last_hidden_state[torch.arange(2), eos])
    states, packed = model.split_cond(cond.detach())
    torch.testing.assert_close(packed, pooled, rtol=0, atol=1e-6)
    assert torch.equal(cond[:, 77, 32:], torch.zeros(2, 64))
    torch.testing.assert_close(states[..., 32:], out.hidden_states[-2], rtol=0, atol=0)


def _run(mode: str, pretrained: Path, icd: Path, out: Path) -> Trainer:
    """Two steps of ``mode`` (``lora``: data removal with rank-4 UNet adapters)."""
    cfg = load_config(RunConfig, None, [
        f"out_dir={out}", f"model.pretrained={pretrained}", "model.grid=4", f"data.shards={icd}/ann/*.tar",
        "data.batch_size=2", "data.max_samples=8", f"train.mode={'data-removal' if mode == 'lora' else mode}",
        "train.train_text_encoder=false", "train.max_steps=2", "train.warmup_steps=0",
        f"train.lr={0.05 if mode == 'lora' else 0.001}", "train.ema_decay=null", "train.log_every=1",
        "train.tensorboard=false", *(LORA if mode == "lora" else [])])
    trainer = Trainer(cfg)
    trainer.fit(progress=False)
    return trainer


@pytest.fixture(scope="module", params=MODES)
def trained(request, tiny_sdxl_dir, tiny_icd, tmp_path_factory):
    """``(mode, trainer after fit, the untouched starting model)`` per mode."""
    start = ModelConfig(pretrained=str(tiny_sdxl_dir), grid=4).build()
    trainer = _run(request.param, tiny_sdxl_dir, tiny_icd, tmp_path_factory.mktemp(request.param))
    return request.param, trainer, start


def _assert_only_rows_changed(before: dict, after: dict, rows: list[int]) -> None:
    """Every tensor equal except the embedding table's rows ``rows``, which all changed."""
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key.endswith("token_embedding.weight"):
            keep = torch.ones(len(value), dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(after[key][keep], value[keep]), key
            assert not (after[key][rows] == value[rows]).all(-1).any(), "a location row did not train"
        else:
            assert torch.equal(after[key], value), key


def test_two_steps_change_only_what_the_mode_trains(trained):
    mode, trainer, start = trained
    model = trainer.model
    assert isinstance(model, SDXLModel)
    assert [g["name"] for g in trainer.groups] == {"data-removal": ["unet", "loc_rows"], "model-removal": ["loc_rows"],
                                                   "lora": ["unet_lora", "loc_rows"]}[mode]
    assert [p.shape for p in trainer.groups[-1]["params"]] == [(16, 32), (16, 64)]  # rows in both encoders
    _assert_only_rows_changed(start.text_encoder.state_dict(), model.text_encoder.state_dict(), start.loc_token_ids)
    _assert_only_rows_changed(start.text_encoder_2.state_dict(), model.text_encoder_2.state_dict(),
                              start.loc_token_ids_2)
    for a, b in zip(start.vae.state_dict().values(), model.vae.state_dict().values()):
        assert torch.equal(a, b)
    # The run's model folder reads back as SDXL with the trained weights (under LoRA: the base UNet and the
    # adapter, unmerged; the run's pipeline export merged the adapter into the live model).
    back = load_model(trainer.out / "model")
    assert isinstance(back, SDXLModel) and has_lora(back.unet) == (mode == "lora")
    base, now = start.unet.state_dict(), base_state_dict(back.unet)
    assert base.keys() == now.keys()
    changed = [k for k in base if not torch.equal(base[k], now[k])]
    assert changed == list(base) if mode == "data-removal" else not changed, changed[:3]
    adapters = {n: p for n, p in back.unet.named_parameters() if ".lora_" in n}
    # 4 transformer blocks x 2 attentions x (q, k, v, out) x (A, B); B trained away from zero
    assert len(adapters) == (4 * 2 * 4 * 2 if mode == "lora" else 0)
    assert all(p.abs().max() > 0 for p in adapters.values())
    pairs = [(back.text_encoder_2, model.text_encoder_2)] + ([(back.unet, model.unet)] if mode != "lora" else [])
    for a, b in pairs:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    rows = load_file(str(trainer.out / "location_tokens.safetensors"))
    assert torch.equal(rows["clip_g"], model.text_encoder_2.get_input_embeddings().weight[start.loc_token_ids_2])


def test_exported_pipeline_samples_the_same_image_in_plain_diffusers(trained):
    mode, trainer, _ = trained
    path = trainer.out / "pipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    # geomerase's DDIM (SamplerConfig.build): no clipping inside the scheduler, no alpha-one final step
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    steps, scale, seed, res = 3, 3.0, 7, trainer.model.resolution
    theirs = pipe("a red ring", negative_prompt=NEGATIVE, height=res, width=res, num_inference_steps=steps,
                  guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ours = sample(trainer.model, ["a red ring"], negatives=[NEGATIVE], seeds=[seed],
                  cfg=SamplerConfig(steps=steps, guidance_scale=scale))  # [-1, 1]
    assert theirs.shape == ours.shape == (1, 3, res, res)
    assert (theirs - (ours + 1) / 2).abs().max().item() <= 1e-4
    # Both encoders' trained location rows reach the negative prompt's conditioning in plain diffusers.
    emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt("a red ring", negative_prompt=NEGATIVE)
    with torch.no_grad():
        states, packed = trainer.model.split_cond(trainer.model.encode_text(trainer.model.tokenize([NEGATIVE])))
    torch.testing.assert_close(neg_emb, states, rtol=0, atol=1e-5)
    torch.testing.assert_close(neg_pooled, packed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("trained", ["lora"], indirect=True)
def test_base_plus_lora_and_tokens_sample_in_plain_diffusers_like_geomerase(trained, tiny_sdxl_dir, tmp_path):
    """A user's own SDXL (here the untouched base folder) + the exported LoRA + the two-encoder token file, loaded
    with diffusers' own calls only, samples the LoRA fine-tune's image."""
    _, trainer, _ = trained
    lora = export_lora(load_model(trainer.out / "model"), tmp_path / "lora")
    assert lora.name == LORA_WEIGHTS
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.load_lora_weights(str(lora.parent))
    rows = load_file(str(trainer.out / "location_tokens.safetensors"))
    tokens = [f"<l{i}>" for i in range(16)]
    pipe.load_textual_inversion(rows["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    steps, scale, seed, res = 3, 3.0, 7, trainer.model.resolution
    theirs = pipe("a red ring", negative_prompt=NEGATIVE, height=res, width=res, num_inference_steps=steps,
                  guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ours = sample(load_model(trainer.out / "model"), ["a red ring"], negatives=[NEGATIVE], seeds=[seed],
                  cfg=SamplerConfig(steps=steps, guidance_scale=scale))  # base + adapter, as the user has it
    assert theirs.shape == ours.shape == (1, 3, res, res)
    assert (theirs - (ours + 1) / 2).abs().max().item() <= 1e-4
    pipe.unload_lora_weights()
    without = pipe("a red ring", negative_prompt=NEGATIVE, height=res, width=res, num_inference_steps=steps,
                   guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    assert (theirs - without).abs().max() > 1e-3  # the adapter is not a no-op


def test_training_both_encoders_whole_is_refused(tiny_sdxl_dir, tiny_icd, tmp_path):
    with pytest.raises(ValueError, match="train_text_encoder=false"):
        Trainer(load_config(RunConfig, None, [f"out_dir={tmp_path}", f"model.pretrained={tiny_sdxl_dir}",
                                              f"data.shards={tiny_icd}/ann/*.tar", "data.batch_size=2",
                                              "data.max_samples=4"]))


def test_sdxl_gpu_config_loads():
    cfg = load_config(RunConfig, ROOT / "configs" / "sdxl_h100_zero2.yaml")
    assert (cfg.train.backend, cfg.deepspeed.stage, cfg.deepspeed.precision) == ("deepspeed", 2, "bf16")
    assert cfg.train.gradient_checkpointing and not cfg.train.train_text_encoder
    assert cfg.data.loader == "memory" and cfg.data.precompute_latents and not cfg.data.hflip
