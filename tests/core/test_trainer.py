"""One training step changes only what the mode allows; checkpoints resume exactly."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from geomerase.core.config import load_config
from geomerase.core.models import load_model
from geomerase.core.trainer import RunConfig, Trainer


def _cfg(icd, out, *extra):
    return load_config(RunConfig, "configs/tiny_cpu.yaml", [
        "model.size=debug", f"data.shards={icd}/ann/*.tar", "data.batch_size=4", f"out_dir={out}",
        "train.log_every=1", "train.warmup_steps=0", "train.threads=2", *extra])


def _snapshot(model):
    sd = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    sd.update({f"text.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()})
    return sd


def test_model_removal_changes_only_location_rows(tiny_icd, tmp_path):
    tr = Trainer(_cfg(tiny_icd, tmp_path, "train.mode=model-removal", "train.max_steps=1", "train.lr=0.1"))
    before = _snapshot(tr.model)
    loss, _ = tr.train_step(0)
    assert torch.isfinite(loss)
    after = _snapshot(tr.model)
    loc = tr.model.loc_token_ids
    key = "text.embeddings.token_embedding.weight"
    for k in before:
        if k == key:
            continue
        assert torch.equal(before[k], after[k]), f"{k} changed in model removal"
    frozen = torch.ones(before[key].shape[0], dtype=torch.bool)
    frozen[loc] = False
    assert torch.equal(before[key][frozen], after[key][frozen])
    assert not torch.equal(before[key][loc], after[key][loc])
    # Only the (G^2, D) rows are optimised: no vocabulary-sized parameter or gradient.
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(params) == 1 and params[0].shape == (16, before[key].shape[1])


def test_data_removal_trains_unet_and_text_encoder(tiny_icd, tmp_path):
    tr = Trainer(_cfg(tiny_icd, tmp_path, "train.mode=data-removal", "train.max_steps=1"))
    before = _snapshot(tr.model)
    tr.train_step(0)
    after = _snapshot(tr.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("unet.") for k in changed)
    assert "text.embeddings.token_embedding.weight" in changed


def test_data_removal_frozen_text_encoder_trains_only_location_rows_of_it(tiny_icd, tmp_path):
    tr = Trainer(_cfg(tiny_icd, tmp_path, "train.mode=data-removal", "train.train_text_encoder=false",
                      "train.max_steps=1"))
    before = _snapshot(tr.model)
    tr.train_step(0)
    after = _snapshot(tr.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("unet.") for k in changed)
    assert {k for k in changed if k.startswith("text.")} == {"text.embeddings.token_embedding.weight"}


def test_resume_reproduces_uninterrupted_losses(tiny_icd, tmp_path):
    full = Trainer(_cfg(tiny_icd, tmp_path / "full", "train.max_steps=4"))
    full.fit(progress=False)
    part = Trainer(_cfg(tiny_icd, tmp_path / "part", "train.max_steps=4", "train.save_every=2"))
    part.fit(progress=False, stop_at=3)  # dies after step 3; the step-2 checkpoint survives
    resumed = Trainer(_cfg(tiny_icd, tmp_path / "part", "train.max_steps=4", "resume=latest"))
    resumed.fit(progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # the resumed run's loss.csv reads like the uninterrupted one's (integer steps, not "2.0")
    steps = [line.split(",")[0] for line in (tmp_path / "part" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [line.split(",")[0] for line in (tmp_path / "full" / "loss.csv").read_text().splitlines()[1:]]
    a = load_model(tmp_path / "full" / "model")
    b = load_model(tmp_path / "part" / "model")
    for (k, v), (_, w) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(v, w), k
    assert (tmp_path / "full" / "loss.png").is_file()


def test_tampered_checkpoint_falls_back(tiny_icd, tmp_path, caplog):
    from geomerase.core.checkpoint import latest_valid_checkpoint, list_checkpoints

    Trainer(_cfg(tiny_icd, tmp_path, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3")).fit(
        progress=False)
    ckpts = list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    with open(ckpts[-1] / "optimizer.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    assert latest_valid_checkpoint(tmp_path) == ckpts[0]
    assert "checksum mismatch" in caplog.text


def test_grad_accumulation_matches_the_full_batch(tiny_icd, tmp_path):
    one = Trainer(_cfg(tiny_icd, tmp_path / "a", "train.max_steps=2", "train.ema_decay=null"))
    two = Trainer(_cfg(tiny_icd, tmp_path / "b", "train.max_steps=2", "train.ema_decay=null", "train.grad_accum=2"))
    for step in range(2):
        la, ga = one.train_step(step)
        lb, gb = two.train_step(step)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=0)
    # (Step 2's loss already checks the first update; element-wise weights are not compared: Adam's
    # g/sqrt(v) turns rounding-level gradient differences of near-zero entries into lr-sized ones.)
    with pytest.raises(ValueError, match="divisible"):
        Trainer(_cfg(tiny_icd, tmp_path / "c", "train.grad_accum=3"))


def test_pretrained_latent_model_trains_with_frozen_vae_and_exports_a_pipeline(tiny_icd, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = _cfg(tiny_icd, tmp_path / "run", f"model.pretrained={tiny_sd_dir}", "model.prediction_type=null",
               "train.train_text_encoder=false", "train.max_steps=2", "data.precompute_latents=true",
               "train.reweight_alpha=2.0")
    tr = Trainer(cfg)
    moments = tr.batches.latent_moments
    assert moments is not None and moments.shape == (len(tr.data), 8, 8, 8)
    vae_before = {k: v.clone() for k, v in tr.model.vae.state_dict().items()}
    first = tr.batches(0)
    again = tr.batches(0)
    assert torch.equal(first.x0, again.x0) and torch.equal(first.xt, again.xt)  # latents from (seed, step)
    assert torch.equal(tr.module(first), tr.module(again))
    tr.fit(progress=False)
    for k, v in tr.model.vae.state_dict().items():
        assert torch.equal(v, vae_before[k]), f"VAE changed: {k}"
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"), local_files_only=True)
    assert pipe.tokenizer.convert_tokens_to_ids("<l15>") == len(pipe.tokenizer) - 1
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer)
    img = pipe("a red ring", negative_prompt="qr code <l0> <l5>", num_inference_steps=2, height=16, width=16,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_validation_grids_every_n_steps(tiny_icd, tmp_path):
    from PIL import Image

    tr = Trainer(_cfg(tiny_icd, tmp_path, "train.max_steps=2", "train.sample_every=1", "train.sample_count=3",
                      "train.sample_steps=2", "train.ema_decay=null"))
    tr.fit(progress=False)
    grids = sorted((tmp_path / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    w, h = Image.open(grids[0]).size
    assert w > h > 0  # three images side by side
    # Sampling left the model in training mode for the next step.
    assert tr.model.unet.training and tr.model.text_encoder.training
    with pytest.raises(Exception, match="sample_every"):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["train.sample_every=often"])


def test_triton_location_embedding_trains_like_the_torch_one(tiny_icd, tmp_path):
    """``train.embedding_backend=triton`` (the fused kernel; on CPU under ``TRITON_INTERPRET=1``) takes the same
    model-removal steps as the pure-torch reference: same location rows, every other weight bit-identical."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU trainer reaches the Triton kernel only under TRITON_INTERPRET=1")
    from geomerase import kernels
    from geomerase.core.text_embedding import install_location_embedding

    key = "text.embeddings.token_embedding.weight"
    runs = {}
    for backend in ("torch", "triton"):
        tr = Trainer(_cfg(tiny_icd, tmp_path / backend, "train.mode=model-removal", "train.max_steps=2", "train.lr=0.1",
                          "train.ema_decay=null", "data.batch_size=2", "train.threads=1",
                          f"train.embedding_backend={backend}"))
        emb = install_location_embedding(tr.model.text_encoder, tr.model.loc_token_ids)  # the installed module
        assert emb.backend == backend
        assert emb._fn is (kernels.loc_embedding if backend == "triton" else kernels.loc_embedding_ref)
        before = _snapshot(tr.model)
        losses = [tr.train_step(step)[0] for step in range(2)]
        runs[backend] = (before, _snapshot(tr.model), losses)
    (before, ref, ref_losses), (before_k, out, losses) = runs["torch"], runs["triton"]
    loc = tr.model.loc_token_ids
    frozen = torch.ones(ref[key].shape[0], dtype=torch.bool)
    frozen[loc] = False
    assert all(torch.equal(before[k], before_k[k]) for k in before)  # same start
    assert not torch.equal(ref[key][loc], before[key][loc])  # the rows did train
    torch.testing.assert_close(out[key][loc], ref[key][loc], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=0)
    assert torch.equal(out[key][frozen], before[key][frozen])
    assert all(torch.equal(out[k], before[k]) for k in before if k != key)


def test_uncond_prior_keeps_the_pretrained_unconditional_branch(tiny_icd, tmp_path):
    """With every caption dropped, the target is the frozen start's own prediction: zero loss, zero
    update. Rows with captions keep the data's target (same loss as without the prior)."""
    start = tmp_path / "start"
    Trainer(_cfg(tiny_icd, tmp_path / "init", "train.max_steps=1")).model.save(start)
    dropped = Trainer(_cfg(tiny_icd, tmp_path / "a", f"model.pretrained={start}", "train.uncond_prior=true",
                           "captions.dropout=1.0", "train.train_text_encoder=false"))
    before = _snapshot(dropped.model)
    loss, _ = dropped.train_step(0)
    assert loss.item() == 0.0
    after = _snapshot(dropped.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    kept = [Trainer(_cfg(tiny_icd, tmp_path / name, f"model.pretrained={start}", f"train.uncond_prior={flag}",
                         "captions.dropout=0.0", "train.train_text_encoder=false")).train_step(0)[0].item()
            for name, flag in (("b", "true"), ("c", "false"))]
    assert kept[0] == kept[1] > 0.0
    with pytest.raises(ValueError, match="needs model.pretrained"):
        Trainer(_cfg(tiny_icd, tmp_path / "d", "train.uncond_prior=true"))
    with pytest.raises(ValueError, match="data-removal"):
        _cfg(tiny_icd, tmp_path / "e", "train.uncond_prior=true", "train.mode=model-removal")
