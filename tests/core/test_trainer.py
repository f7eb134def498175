"""One training step changes only what the mode allows; checkpoints resume exactly."""
from __future__ import annotations

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
