"""``geomerase base build``: make a base model (the stand-in for a pretrained Stable Diffusion).

One command from one config (``configs/base32_cpu.yaml``): build the concept-free corpus
(:mod:`geomerase.data.corpus`), pretrain the whole model on it (UNet and text encoder, clean
captions), and export the result as a shipped builtin (:mod:`geomerase.core.builtin`) with its
loss curve and a sample grid. Every stage is resumable: the corpus keeps finished shards, the
trainer resumes from its latest valid checkpoint, so rerunning the command after an interruption
continues where it stopped (``--until-step`` stops early, e.g. to give the CPU back).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from geomerase.core.builtin import export_builtin, materialise
from geomerase.core.metrics import sample_grid
from geomerase.core.models import load_model
from geomerase.core.sampling import SamplerConfig, sample, to_uint8
from geomerase.core.trainer import RunConfig, Trainer
from geomerase.data.corpus import build_corpus
from geomerase.data.shards import atomic_write

log = logging.getLogger("geomerase.pretrain")


@dataclass
class CorpusConfig:
    n: int = 24000
    """Images in the corpus (held in memory at the model's resolution while training)."""
    size: int = 64
    """Render size in pixels (area-downsampled to the model's resolution by the loader)."""
    seed: int = 7
    """Corpus seed (disjoint from the ICD seeds the demo and the benchmark use)."""
    rich_prob: float = 0.5
    """Share of multi-object scenes with every object's position in the caption (the rest are ICD scenes)."""


@dataclass
class BaseBuildConfig:
    name: str = "base32"
    """Builtin name the weights are exported under (``model.pretrained=builtin:<name>``)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The pretraining corpus."""
    run: RunConfig = field(default_factory=RunConfig)
    """The pretraining run (model size, data, captions, optimisation); ``run.data.shards`` names the corpus."""
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red circle on a blue background",
        "a large white square in the top left of a black background",
        "a small yellow triangle at the bottom right on a purple background",
        "a green background with a large black ring on the left and a small white cross in the top right",
        "a big orange cross on a blue background",
        "a black background with a medium red square at the top and a small yellow circle at the bottom",
        "a white ring in the center of a green image",
        "a purple triangle on the right of a yellow background",
    ])
    """Prompts of the sample grid written beside the exported weights (8 seeds each)."""
    results_dir: str = "benchmarks/results/base"
    """Where the loss curve, sample grid and build record go (``<results_dir>/<name>/``)."""
    weights_dir: str | None = None
    """Folder the builtin is exported into (``<weights_dir>/<name>/``); None: the package's
    ``geomerase/weights``, where ``builtin:<name>`` finds it."""


def build_base(cfg: BaseBuildConfig, until_step: int | None = None, progress: bool = True) -> dict:
    """Corpus, then training (resumed), then export. Returns the build record (also written as
    ``<results_dir>/<name>/build.json`` once the export ran)."""
    t0 = time.time()
    corpus_dir = Path(cfg.run.data.shards).parent
    build_corpus(cfg.corpus.n, cfg.corpus.size, cfg.corpus.seed, corpus_dir, cfg.corpus.rich_prob,
                 progress=progress)
    run = replace(cfg.run, resume=cfg.run.resume or "latest")
    trainer = Trainer(run)
    t_train = time.time()
    try:
        trainer.fit(progress=progress, stop_at=until_step)
    finally:
        trainer.backend.shutdown()
        # One row per call: a resumed build's wall time is the sum over its rows.
        with open(Path(run.out_dir) / "build_log.jsonl", "a") as f:
            f.write(json.dumps({"end_step": trainer.step, "seconds": round(time.time() - t_train, 1),
                                "threads": run.train.threads}) + "\n")
    if trainer.step < run.train.max_steps:
        log.info("stopped at step %d of %d; rerun to continue", trainer.step, run.train.max_steps)
        return {"step": trainer.step, "done": False}
    captions = [r.caption for r in trainer.data.records] if trainer.data is not None else []
    out = Path(cfg.results_dir) / cfg.name
    root = Path(cfg.weights_dir) if cfg.weights_dir else None
    model_dir = Path(run.out_dir) / "model"
    record = export_builtin(load_model(model_dir), model_dir, cfg.name, captions, seed=run.model.seed, root=root)
    record.update(_train_record(Path(run.out_dir)), corpus=vars(cfg.corpus), config_seconds=time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    _copy_loss_curve(Path(run.out_dir), out)
    sample_builtin_grid(cfg.name, cfg.sample_prompts, out / "samples.png", root=root)
    atomic_write(out / "build.json", json.dumps(record, indent=1) + "\n")
    return record


def sample_builtin_grid(name: str, prompts: Sequence[str], path: Path, per_prompt: int = 8,
                        steps: int = 25, guidance_scale: float = 3.0, root: Path | None = None) -> Path:
    """A ``len(prompts) x per_prompt`` grid of samples of builtin ``name`` (one prompt per row)."""
    model = load_model(materialise(name, root=root))
    model.unet.eval()
    model.text_encoder.eval()
    ps = [p for p in prompts for _ in range(per_prompt)]
    imgs = sample(model, ps, seeds=list(range(len(ps))), cfg=SamplerConfig(steps=steps, guidance_scale=guidance_scale))
    return sample_grid(to_uint8(imgs), path, cols=per_prompt, title=f"builtin:{name} (one prompt per row)")


def _train_record(run_dir: Path) -> dict:
    """Steps, final loss and training wall time summed over every (resumed) call."""
    calls = [json.loads(line) for line in (run_dir / "build_log.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"steps": summary["steps"], "final_loss": summary["final_loss"], "train_calls": calls,
            "train_seconds": round(sum(c["seconds"] for c in calls), 1)}


def _copy_loss_curve(run_dir: Path, out: Path) -> None:
    import shutil

    for name in ("loss.png", "loss.csv"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
