"""The step's halves: batches split over processes/micro-batches see the global batch's draws, and
the step module registers exactly the trainable parameters."""
from __future__ import annotations

import torch

from geomerase.core.config import load_config
from geomerase.core.trainer import RunConfig, Trainer
from geomerase.core.train_step import StepModule, TrainBatch


def _trainer(icd, out, *extra) -> Trainer:
    return Trainer(load_config(RunConfig, "configs/tiny_cpu.yaml", [
        "model.size=debug", f"data.shards={icd}/ann/*.tar", "data.batch_size=4", f"out_dir={out}",
        "train.threads=1", "train.warmup_steps=0", *extra]))


def test_parts_of_a_batch_are_rows_of_the_whole_batch(tiny_icd, tmp_path):
    tr = _trainer(tiny_icd, tmp_path)
    whole = tr.batches(3)
    halves = [tr.batches(3, (k, 2)) for k in range(2)]
    for name in ("x0", "noise", "t", "xt", "masks"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name)), name
    assert sum((h.captions for h in halves), []) == whole.captions
    assert not torch.equal(tr.batches(4).noise, whole.noise)  # another step, other draws
    assert whole.x0.shape == whole.noise.shape == whole.xt.shape and whole.t.shape == (4,)


def test_step_module_holds_only_trainable_parameters(tiny_icd, tmp_path):
    dr = _trainer(tiny_icd, tmp_path / "dr", "train.train_text_encoder=false")
    names = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("parts.") else n
             for n, _ in dr.module.named_parameters()}
    assert names == {"parts.unet", "loose_0"}  # UNet whole, the location rows loose; no frozen text encoder
    assert {id(p) for p in dr.module.parameters()} == {id(p) for p in dr.params}
    mr = _trainer(tiny_icd, tmp_path / "mr", "train.mode=model-removal")
    assert [n for n, _ in mr.module.named_parameters()] == ["loose_0"]
    assert mr.module.parts.keys() == set()


def test_loss_is_a_function_of_the_batch_only(tiny_icd, tmp_path):
    tr = _trainer(tiny_icd, tmp_path)
    batch = tr.batches(0)
    assert isinstance(tr.module, StepModule) and isinstance(batch, TrainBatch)
    a, b = tr.module(batch), tr.module(batch)
    assert a.ndim == 0 and torch.isfinite(a) and torch.equal(a, b)
    moved = TrainBatch(batch.x0, batch.noise, (batch.t + 500) % 1000, batch.xt, batch.captions, batch.masks)
    assert not torch.equal(tr.module(moved), a)


def test_alignment_weight_adds_the_alignment_term_to_the_denoising_loss(tiny_icd, tmp_path):
    from geomerase.core.attention_align import alignment_loss, alignment_targets, recorded_cross_attention

    plain = _trainer(tiny_icd, tmp_path / "p")
    aligned = _trainer(tiny_icd, tmp_path / "a", "train.attn_align_weight=0.5")
    batch = plain.batches(0)
    m = aligned.model
    assert any("<l" in c for c in batch.captions)
    ids = m.tokenize(batch.captions)
    targets = alignment_targets(ids, m.loc_token_ids, m.grid, aligned.module._boundary_ids)
    with torch.no_grad(), recorded_cross_attention(m.unet) as probs:
        m.denoise(batch.xt, batch.t, m.encode_text(ids))
    extra = 0.5 * alignment_loss(probs, targets)
    assert extra.item() > 0
    with torch.no_grad():
        torch.testing.assert_close(aligned.module(batch), plain.module(batch) + extra, rtol=1e-5, atol=1e-6)
    aligned.train_step(0)  # one optimizer step through the backend runs
