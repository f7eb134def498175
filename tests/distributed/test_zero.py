"""DeepSpeed ZeRO on CPU (gloo): same losses as the single-process loop, exact resume after SIGKILL."""
from __future__ import annotations

import csv
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from geomerase.core.config import ConfigError, load_config  # noqa: E402
from geomerase.core.trainer import RunConfig, Trainer  # noqa: E402

from geomerase.distributed.launch import torchrun_cmd  # noqa: E402
from zero_launch import ROOT, rank_env, sigkill_tree, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def zero_icd(tmp_path_factory):
    """48 annotated 32 px samples in 4 shards (oracle detector, grid 4). Defined here, not in the
    folder's conftest, which the Ray tests own."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    root = tmp_path_factory.mktemp("zero_icd")
    build_icd("qr", 48, 0.5, 32, 0, root / "raw", shard_size=12, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return root


def _overrides(icd, out, *extra):
    return ["model.size=debug", "model.prediction_type=null", f"data.shards={icd}/ann/*.tar", "data.batch_size=8",
            f"out_dir={out}", "train.log_every=1", "train.warmup_steps=2", "train.threads=1",
            "train.tensorboard=false", *extra]


def _losses(out):
    with open(out / "loss.csv") as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def _unet(out):
    return load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference(zero_icd, tmp_path_factory):
    """The single-process loop, 6 steps, EMA on."""
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny_cpu_zero2.yaml",
                      _overrides(zero_icd, out, "train.backend=local", "train.max_steps=6"))
    Trainer(cfg).fit(progress=False)
    return out


def _assert_close_run(ref, out, rtol_loss=1e-4):
    a, b = _losses(ref), _losses(out)
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= rtol_loss * abs(a[step]), (step, a[step], b[step])
    ua, ub = _unet(ref), _unet(out)
    assert ua.keys() == ub.keys()
    for k in ua:
        torch.testing.assert_close(ub[k], ua[k], rtol=1e-4, atol=1e-5, msg=k)


def test_zero2_two_ranks_match_single_process_and_resume_after_sigkill(zero_icd, reference, tmp_path):
    full = tmp_path / "full"
    torchrun(2, ["--config", "configs/tiny_cpu_zero2.yaml",
                 *_overrides(zero_icd, full, "train.max_steps=6", "train.save_every=2")])
    _assert_close_run(reference, full)
    ck = full / "checkpoints" / "step-000006"
    names = {p.name for p in ck.iterdir()}
    assert {"model", "optimizer.safetensors", "extra.safetensors", "trainer.json", "manifest.json"} <= names
    assert not list(ck.rglob("*.pt")) and not list(ck.rglob("*.bin"))  # nothing pickled
    assert (full / "model" / "unet" / "config.json").is_file()

    # Kill both ranks (and the launcher) with SIGKILL once the step-2 checkpoint exists, resume.
    part = tmp_path / "part"
    cmd = torchrun_cmd(2, ["--no-progress", "--config", "configs/tiny_cpu_zero2.yaml",
                           *_overrides(zero_icd, part, "train.max_steps=6", "train.save_every=2")])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=rank_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (part / "checkpoints" / "step-000002").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        sigkill_tree(proc.pid)  # the launcher and both ranks
        proc.wait()
    assert (part / "checkpoints" / "step-000002").is_dir()
    assert not (part / "model").exists(), "the run finished before the kill: nothing was resumed"
    torchrun(2, ["--config", "configs/tiny_cpu_zero2.yaml", "--resume", "latest",
                 *_overrides(zero_icd, part, "train.max_steps=6", "train.save_every=2")])
    a, b = _losses(full), _losses(part)
    assert [b[s] for s in (3, 4, 5, 6)] == [a[s] for s in (3, 4, 5, 6)]  # bit-identical in fp32 on CPU
    for k, v in _unet(full).items():
        assert torch.equal(v, _unet(part)[k]), k


def test_zero3_two_ranks_match_single_process(zero_icd, reference, tmp_path):
    out = tmp_path / "z3"
    torchrun(2, ["--config", "configs/tiny_cpu_zero3.yaml", *_overrides(zero_icd, out, "train.max_steps=6")])
    _assert_close_run(reference, out)


def test_deepspeed_config_generation_and_errors(tmp_path):
    from geomerase.distributed.deepspeed_engine import deepspeed_config

    cfg = load_config(RunConfig, ROOT / "configs" / "tiny_cpu_zero3.yaml",
                      ["data.batch_size=32", "train.grad_accum=2", "deepspeed.precision=bf16",
                       "deepspeed.extra={zero_optimization: {sub_group_size: 1000}}"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["sub_group_size"] == 1000
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "optimizer" not in ds
    with pytest.raises(ValueError, match="deepspeed.stage must be"):
        load_config(RunConfig, ROOT / "configs" / "tiny_cpu_zero2.yaml", ["deepspeed.stage=4"])
    with pytest.raises(ConfigError, match="deepspeed.stages"):
        load_config(RunConfig, ROOT / "configs" / "tiny_cpu_zero2.yaml", ["deepspeed.stages=2"])
    with pytest.raises(ValueError, match="optimizer"):
        load_config(RunConfig, ROOT / "configs" / "tiny_cpu_zero2.yaml", ["deepspeed.extra={optimizer: {type: Adam}}"])
    for name in ("tiny_cpu_zero1", "tiny_cpu_zero2", "tiny_cpu_zero3", "tiny_cpu_model_removal_zero2",
                 "sd15_h100_zero2", "sd15_h100_zero3", "sdxl_h100_zero2"):
        c = load_config(RunConfig, ROOT / "configs" / f"{name}.yaml")
        assert c.train.backend == "deepspeed", name

