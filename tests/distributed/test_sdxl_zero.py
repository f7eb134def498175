"""SDXL under DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo, 2 ranks, fp32): four steps of each mode from a tiny
random SDXL folder with ``configs/sdxl_h100_zero2.yaml`` (cached latents, gradient checkpointing) match the
single-process loop, and the frozen parts stay bit-identical."""
from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from geomerase.core.config import load_config  # noqa: E402
from geomerase.core.sdxl import write_tiny_sdxl  # noqa: E402
from geomerase.core.trainer import RunConfig, Trainer  # noqa: E402

from zero_launch import ROOT, torchrun  # noqa: E402

CONFIG = "configs/sdxl_h100_zero2.yaml"
PARTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
         "text_encoder_2": "model.safetensors"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(tiny SDXL folder, annotated shards)``: 16 annotated 32 px samples, grid 4 (oracle detector)."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    root = tmp_path_factory.mktemp("sdxl_zero")
    build_icd("qr", 16, 0.5, 32, 0, root / "raw", shard_size=8, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return write_tiny_sdxl(root / "sdxl"), root / "ann"


def _overrides(setup, out, mode, *extra):
    sdxl, ann = setup
    return [f"model.pretrained={sdxl}", f"data.shards={ann}/*.tar", "data.batch_size=4", f"out_dir={out}",
            f"train.mode={mode}", "train.device=cpu", "train.max_steps=4", "train.warmup_steps=0", "train.lr=0.001",
            "train.ema_decay=null", "train.log_every=1", "train.threads=1", "train.tensorboard=false",
            "deepspeed.precision=fp32", "deepspeed.overlap_comm=false", *extra]


def _losses(out):
    with open(out / "loss.csv") as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def _weights(out, part):
    return load_file(str(out / "model" / part / PARTS[part]))


@pytest.fixture(scope="module", params=("data-removal", "model-removal"))
def reference(request, setup, tmp_path_factory):
    """``(mode, single-process run folder)``."""
    out = tmp_path_factory.mktemp("ref")
    Trainer(load_config(RunConfig, ROOT / CONFIG, _overrides(setup, out, request.param, "train.backend=local"))) \
        .fit(progress=False)
    return request.param, out


@pytest.mark.parametrize("stage", (2, 3))
def test_sdxl_two_ranks_match_single_process(setup, reference, stage, tmp_path):
    mode, ref = reference
    out = tmp_path / f"z{stage}"
    torchrun(2, ["--config", CONFIG, *_overrides(setup, out, mode, f"deepspeed.stage={stage}")])
    a, b = _losses(ref), _losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    start = {p: load_file(str(setup[0] / p / PARTS[p])) for p in PARTS}
    for part in PARTS:
        ours, theirs = _weights(out, part), _weights(ref, part)
        for key, value in theirs.items():
            # Adam's first steps move each element by up to lr whatever its gradient's size, so an element whose
            # gradient is ~0 follows the rounding of the 2-rank reduction (measured: 13 of 1.0 M UNet elements
            # off by up to 1.3e-4 at ZeRO-2); a trained element moves by ~1e-3 per step.
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=2e-4, msg=f"{part}/{key}")
            frozen = part != "unet" or mode == "model-removal"
            if frozen and not key.endswith("token_embedding.weight"):
                assert torch.equal(ours[key], start[part][key]), f"{part}/{key} changed"
            elif not frozen:
                assert not torch.equal(ours[key], start[part][key]), f"{part}/{key} did not train"
    for part in ("text_encoder", "text_encoder_2"):  # the base vocabulary rows stay as they were
        key = next(k for k in start[part] if k.endswith("token_embedding.weight"))
        base = start[part][key]
        assert torch.equal(_weights(out, part)[key][:len(base)], base)
