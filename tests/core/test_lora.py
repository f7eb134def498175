"""LoRA data removal and the portable exports, on a tiny Stable-Diffusion-shaped pipeline folder.

Only the UNet adapters and the location-token rows train (everything else bit-identical, the
optimizer holds exactly those); model removal trains only the rows; a LoRA run resumes exactly;
and plain diffusers (a process that never imports geomerase) given the *base* folder, the
exported LoRA and the location-token file samples what geomerase samples.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from geomerase import cli
from geomerase.core.config import ConfigError, load_config
from geomerase.core.export import LOCATION_TOKENS_FILE, export_lora, location_token_tensors, save_location_tokens
from geomerase.core.lora import LORA_DIR, LORA_WEIGHTS, base_state_dict, has_lora
from geomerase.core.models import load_model
from geomerase.core.sampling import SamplerConfig, sample
from geomerase.core.text_embedding import install_location_embedding
from geomerase.core.trainer import RunConfig, Trainer

NEGATIVE = "qr code " + " ".join(f"<l{i}>" for i in range(16))
PROMPT = "a red ring"
STEPS, SCALE, SEED = 3, 3.0, 7
LORA = ["train.mode=data-removal", "train.train_text_encoder=false", "train.lora.rank=4", "train.lora.alpha=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(icd: Path, sd: Path, out: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, [
        f"model.pretrained={sd}", "model.grid=4", f"data.shards={icd}/ann/*.tar", "data.batch_size=4",
        f"out_dir={out}", "train.log_every=1", "train.warmup_steps=0", "train.lr=0.01", "train.max_steps=2",
        *extra])


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """Every base weight of UNet, text encoder (location rows included) and VAE, cloned."""
    sd = {f"unet.{k}": v.clone() for k, v in base_state_dict(model.unet).items()}
    sd.update({f"text.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()})
    sd.update({f"vae.{k}": v.clone() for k, v in model.vae.state_dict().items()})
    return sd


def _assert_only_rows_changed(before: dict, after: dict, loc: list[int]) -> None:
    key = "text.embeddings.token_embedding.weight"
    for k in before:
        if k != key:
            assert torch.equal(before[k], after[k]), f"{k} changed"
    frozen = torch.ones(before[key].shape[0], dtype=torch.bool)
    frozen[loc] = False
    assert torch.equal(before[key][frozen], after[key][frozen])
    assert not torch.equal(before[key][loc], after[key][loc])


def test_lora_trains_only_adapters_and_location_rows(tiny_icd, tiny_sd_dir, tmp_path):
    tr = Trainer(_cfg(tiny_icd, tiny_sd_dir, tmp_path, *LORA, "train.ema_decay=null"))
    unet = tr.model.unet
    lora = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    assert has_lora(unet) and len(lora) == 4 * 2 * 4 * 2  # 4 transformer blocks x 2 attentions x (q, k, v, out) x (A, B)
    before, lora_before = _frozen_state(tr.model), {n: p.detach().clone() for n, p in lora.items()}
    for step in range(2):
        assert torch.isfinite(tr.train_step(step)[0])
    _assert_only_rows_changed(before, _frozen_state(tr.model), tr.model.loc_token_ids)
    for n, p in lora.items():  # B leaves zero at step 1, A moves from step 2
        assert not torch.equal(lora_before[n], p.detach()), f"{n} did not train"
    trainable = {id(p) for m in (unet, tr.model.text_encoder, tr.model.vae) for p in m.parameters() if p.requires_grad}
    optimised = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert optimised == trainable == {id(p) for p in tr.module.parameters()}
    rows = install_location_embedding(tr.model.text_encoder, tr.model.loc_token_ids).loc_rows  # the installed one
    assert optimised == {id(p) for p in lora.values()} | {id(rows)}


def test_model_removal_trains_only_location_rows_and_exports_them(tiny_icd, tiny_sd_dir, tmp_path):
    tr = Trainer(_cfg(tiny_icd, tiny_sd_dir, tmp_path, "train.mode=model-removal", "train.ema_decay=null"))
    before = _frozen_state(tr.model)
    for step in range(2):
        tr.train_step(step)
    after = _frozen_state(tr.model)
    _assert_only_rows_changed(before, after, tr.model.loc_token_ids)
    path = save_location_tokens(tr.model, tmp_path / "tokens.safetensors")
    saved = load_file(str(path))
    assert set(saved) == {f"<l{i}>" for i in range(16)}
    rows = after["text.embeddings.token_embedding.weight"][tr.model.loc_token_ids]
    for i in range(16):
        assert torch.equal(saved[f"<l{i}>"], rows[i])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["grid"] == "4" and json.loads(meta["tokens"]) == [f"<l{i}>" for i in range(16)]
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_lora(tr.model, tmp_path / "lora")


@pytest.mark.parametrize("extra, message", [
    (["train.mode=model-removal", "train.lora.rank=4"], "needs train.mode=data-removal"),
    (["train.lora.rank=4"], "train_text_encoder=false"),
    (["train.lora.rank=-1"], "rank must be >= 0"),
])
def test_lora_config_errors(extra, message, tmp_path):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(RunConfig, None, [f"out_dir={tmp_path}", *extra])


def test_lora_run_resumes_exactly(tiny_icd, tiny_sd_dir, tmp_path):
    full = Trainer(_cfg(tiny_icd, tiny_sd_dir, tmp_path / "full", *LORA, "train.max_steps=4"))
    full.fit(progress=False)
    part = Trainer(_cfg(tiny_icd, tiny_sd_dir, tmp_path / "part", *LORA, "train.max_steps=4", "train.save_every=2"))
    part.fit(progress=False, stop_at=3)
    ckpt = tmp_path / "part" / "checkpoints" / "step-000002" / "model"
    assert (ckpt / LORA_DIR / LORA_WEIGHTS).is_file()
    resumed = Trainer(_cfg(tiny_icd, tiny_sd_dir, tmp_path / "part", *LORA, "train.max_steps=4", "resume=latest"))
    resumed.fit(progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for name in (f"model/{LORA_DIR}/{LORA_WEIGHTS}", LOCATION_TOKENS_FILE):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the checkpoint's base UNet is the pretrained one, under the stock keys
    base = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)


_PLAIN_DIFFUSERS = """
import json, sys
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
base, jobs, prompt, steps, scale, seed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], 3, 3.0, 7
for job in jobs:
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    if job["lora"]:
        pipe.load_lora_weights(job["lora"])
    emb = load_file(job["tokens"])
    pipe.load_textual_inversion(list(emb.values()), token=list(emb))
    images = pipe(prompt, negative_prompt=job["negative"], num_inference_steps=steps, guidance_scale=scale,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    save_file({"images": images.contiguous()}, job["out"])
assert not [m for m in sys.modules if m.split(".")[0] == "geomerase"]
"""


def test_plain_diffusers_base_plus_lora_and_tokens_samples_like_geomerase(tiny_icd, tiny_sd_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_icd, tiny_sd_dir, run, *LORA, "train.lr=0.05")).fit(progress=False)
    tokens = run / LOCATION_TOKENS_FILE
    # `geomerase export` writes the same files from the model folder as the run left beside it
    assert cli.main(["export", "--format", "lora", str(run / "model"), str(tmp_path / "lora")]) == 0
    assert cli.main(["export", "--format", "tokens", str(run / "model"), str(tmp_path / "tokens.safetensors")]) == 0
    for a, b in ((run / "model" / LORA_DIR / LORA_WEIGHTS, tmp_path / "lora" / LORA_WEIGHTS),
                 (tokens, tmp_path / "tokens.safetensors")):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), b
    jobs = [{"lora": str(tmp_path / "lora"), "tokens": str(tmp_path / "tokens.safetensors"), "negative": NEGATIVE,
             "out": str(tmp_path / "lora.safetensors")},
            {"lora": None, "tokens": str(tokens), "negative": NEGATIVE, "out": str(tmp_path / "base.safetensors")}]
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_DIFFUSERS)
    subprocess.run([sys.executable, str(script), str(tiny_sd_dir), json.dumps(jobs), PROMPT], check=True,
                   cwd=tmp_path, timeout=300)
    theirs = load_file(jobs[0]["out"])["images"]
    without_lora = load_file(jobs[1]["out"])["images"]

    model = load_model(run / "model")  # base UNet + the adapter, unmerged, as load_lora_weights leaves it
    assert has_lora(model.unet)
    saved = load_file(str(tokens))
    assert all(torch.equal(saved[k], v) for k, v in location_token_tensors(model).items())
    ours = sample(model, [PROMPT], negatives=[NEGATIVE], seeds=[SEED], cfg=SamplerConfig(steps=STEPS, guidance_scale=SCALE))
    assert theirs.shape == ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(theirs, (ours + 1) / 2, rtol=0, atol=1e-4)
    assert (theirs - without_lora).abs().max() > 1e-3  # the adapter is not a no-op

    # `geomerase sample` takes the base + LoRA + token file, and gives the fine-tune's own image
    def cli_sample(out, *model_args):
        args = ["sample", *model_args, "--prompt", PROMPT, "--negative", NEGATIVE, "--n", "1", "--seed", str(SEED),
                "--steps", str(STEPS), "--guidance-scale", str(SCALE), "--out", str(tmp_path / out)]
        assert cli.main(args) == 0
        return torch.from_numpy(np.asarray(Image.open(tmp_path / out).convert("RGB"), dtype=np.int16))

    portable = cli_sample("portable.png", "--model", str(tiny_sd_dir), "--lora", str(tmp_path / "lora"),
                          "--tokens", str(tmp_path / "tokens.safetensors"))
    own = cli_sample("own.png", "--model", str(run / "model"))
    assert portable.shape == own.shape and (portable - own).abs().max() <= 1  # uint8 rounding of ≤ 1e-4
    # a token file of another grid is a one-line error naming the file
    assert cli.main(["sample", "--model", str(tiny_sd_dir), "--grid", "3", "--tokens", str(tmp_path / "tokens.safetensors"),
                     "--out", str(tmp_path / "bad.png")]) != 0
    assert not (tmp_path / "bad.png").exists()

    merged = load_model(run / "pipeline")  # the LoRA folded into a full pipeline folder
    assert not has_lora(merged.unet)
    full = sample(merged, [PROMPT], negatives=[NEGATIVE], seeds=[SEED], cfg=SamplerConfig(steps=STEPS, guidance_scale=SCALE))
    torch.testing.assert_close(full, ours, rtol=0, atol=1e-4)
