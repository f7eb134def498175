"""The demo's stages as picklable jobs, and a small pool that runs independent ones side by side.

On the 2-core CPU the demo is compute-bound, and one process with two torch threads
is a poor use of the cores: the 2-thread step time of the tiny UNet swung between 1.3
and 4 s on this (virtualised, noisy) machine, while two 1-thread processes each kept
~1.3-1.7 s per step (measured with ``benchmarks`` scratch scripts this session; see the
demo report for the run's own timings). So independent stages run as one process per
core with one thread each: the two ICD splits, the two classifiers, the two diffusion
fine-tunes (plain and geom) and the two models' sampling.

Every job writes its own outputs atomically (or returns small tensors), so a demo
interrupted in any stage resumes from what was written.
"""
from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

log = logging.getLogger("geomerase.demo")


def init_worker(threads: int) -> None:
    """Runs once in every pool process: pin torch's thread count, keep logs quiet."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)


@dataclass
class Job:
    """One unit of work: ``fn(*args)`` run in a pool process (must be importable and picklable)."""

    fn: Callable[..., Any]
    args: tuple = ()
    progress_file: str | None = None
    """Optional CSV whose last row's first column is the job's current step (shown as progress)."""
    total: int = 0
    """Steps the progress file counts to."""


class JobPool:
    """Runs independent jobs in ``workers`` processes of ``threads`` torch threads each.

    ``workers == 1`` runs jobs inline in this process (no spawn cost; what a GPU run uses).
    """

    def __init__(self, workers: int, threads: int):
        if workers < 1 or threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {workers}, {threads}")
        self.workers = workers
        self.threads = threads

    def run(self, jobs: dict[str, Job], desc: str = "") -> dict[str, Any]:
        """Run every job; return ``{name: result}``. A failing job re-raises after the others finish."""
        if not jobs:
            return {}
        if self.workers == 1 or len(jobs) == 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(self.threads * self.workers)
            try:
                return {name: job.fn(*job.args) for name, job in jobs.items()}
            finally:
                torch.set_num_threads(prev)
        ctx = mp.get_context("spawn")
        n = min(self.workers, len(jobs))
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=init_worker,
                                 initargs=(self.threads,)) as ex:
            futures = {name: ex.submit(job.fn, *job.args) for name, job in jobs.items()}
            _watch(futures, jobs, desc)
            return {name: f.result() for name, f in futures.items()}


def _last_step(path: str | None) -> int:
    if not path or not os.path.exists(path):
        return 0
    try:
        with open(path) as f:
            rows = list(csv.reader(f))
        return int(float(rows[-1][0])) if len(rows) > 1 else 0
    except (OSError, ValueError, IndexError):
        return 0


def _watch(futures: dict[str, Future], jobs: dict[str, Job], desc: str, poll: float = 2.0) -> None:
    """One progress bar over all jobs: steps from their progress files, else finished jobs."""
    with_steps = {k: j for k, j in jobs.items() if j.progress_file and j.total}
    total = sum(j.total for j in with_steps.values()) or len(jobs)
    bar = tqdm(total=total, desc=desc or "jobs", unit="step" if with_steps else "job")
    done = 0
    while True:
        finished = all(f.done() for f in futures.values())
        if with_steps:
            now = sum(j.total if futures[k].done() else min(_last_step(j.progress_file), j.total)
                      for k, j in with_steps.items())
        else:
            now = sum(f.done() for f in futures.values())
        if now > done:
            bar.update(now - done)
            done = now
        if finished:
            break
        time.sleep(poll)
    bar.close()


# -- jobs -----------------------------------------------------------------------------------
def build_icd_job(concept: str, n: int, ratio: float, size: int, seed: int, out: str) -> float:
    """Write one ICD split; returns seconds."""
    from geomerase.data.icd import build_icd

    t = time.time()
    build_icd(concept, n, ratio, size, seed, out, progress=False)
    return time.time() - t


def coverage(metas: Sequence[dict], sizes: Sequence[tuple[int, int]], grid: int, thr: float) -> torch.Tensor:
    """``(N, G, G)`` ground-truth share of each cell covered by each sample's boxes."""
    from geomerase.core.geometry import GeometryConfig, GridEncoder

    enc = GridEncoder(GeometryConfig(grid=grid, overlap_threshold=thr))
    return torch.stack([torch.from_numpy(enc.coverage(m.get("boxes", []), w, h)).float()
                        for m, (w, h) in zip(metas, sizes)])


def patch_classifier_job(train_glob: str, res: int, grid: int, steps: int, seed: int, out_dir: str,
                         concept: str, calibration_share: float = 0.1) -> float:
    """Train the patch classifier on ground-truth coverage, calibrate its decision threshold on a
    held-back share of the training split, and save it; returns seconds."""
    from geomerase.core.classifiers import (PatchClassifierConfig, calibrate_threshold, save_classifier,
                                            train_patch_classifier)
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    ds = InMemoryDataset(train_glob, res)
    pcfg = PatchClassifierConfig(resolution=res, grid=grid, width=16)
    cov = coverage(ds.metas, ds.sizes, grid, pcfg.overlap_threshold)
    n_cal = int(len(ds) * calibration_share) if len(ds) >= 20 else 0
    n_fit = len(ds) - n_cal
    pc = train_patch_classifier(pcfg, ds.images[:n_fit], cov[:n_fit], steps=steps, batch=32, seed=seed,
                                progress=False)
    cal = calibrate_threshold(pc, ds.images[n_fit:], cov[n_fit:]) if n_cal else {}
    save_classifier(pc, out_dir, {"concept": concept, "calibration": {**cal, "n_images": n_cal}})
    return time.time() - t


def attribute_classifier_job(train_glob: str, res: int, steps: int, seed: int, out_dir: str,
                             backgrounds: list[str], shapes: list[str]) -> float:
    """Train the prompt-fidelity scorer (background colour, main shape) and save it; returns seconds."""
    from geomerase.core.classifiers import (AttributeClassifierConfig, labels_to_index, save_classifier,
                                            train_attribute_classifier)
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    ds = InMemoryDataset(train_glob, res)
    ybg = labels_to_index([m["attributes"]["background"] for m in ds.metas], backgrounds, train_glob)
    ysh = labels_to_index([m["attributes"]["shape"] for m in ds.metas], shapes, train_glob)
    acfg = AttributeClassifierConfig(resolution=res, num_backgrounds=len(backgrounds), num_shapes=len(shapes), width=16)
    ac = train_attribute_classifier(acfg, ds.images, ybg, ysh, steps=steps, batch=32, seed=seed, progress=False)
    save_classifier(ac, out_dir, {"backgrounds": backgrounds, "shapes": shapes})
    return time.time() - t


def train_model_job(run_cfg: Any, progress: bool = False) -> float:
    """Fine-tune one model (a ``RunConfig``, resumed from its latest checkpoint); returns seconds."""
    from geomerase.core.trainer import Trainer

    t = time.time()
    Trainer(run_cfg).fit(progress=progress)
    return time.time() - t


@dataclass
class Arm:
    """One sampling arm: a model, prompts, and the negative-prompt mixture to guide them with."""

    name: str
    model_dir: str
    prompts: list[str]
    negatives: list[str]
    weights: list[float]
    guidance_scale: float

    @property
    def cost(self) -> int:
        """UNet rows per denoising step: the prompts plus one copy per negative prompt."""
        return len(self.prompts) * (1 + len(self.negatives))


def balance(arms: Sequence[Arm], bins: int) -> list[list[Arm]]:
    """Split arms into at most ``bins`` groups of similar total cost (largest first, into the lightest bin)."""
    groups: list[list[Arm]] = [[] for _ in range(max(1, bins))]
    load = [0] * len(groups)
    for a in sorted(arms, key=lambda a: -a.cost):
        i = load.index(min(load))
        groups[i].append(a)
        load[i] += a.cost
    return [g for g in groups if g]


def sample_arms_job(arms: list[Arm], seeds: list[int], sampler_cfg: Any, device: str,
                    backend: str) -> dict[str, torch.Tensor]:
    """Sample every arm with the same seeds; returns ``{arm: (N,3,R,R) uint8}``. Models load once each."""
    from dataclasses import replace

    from geomerase.core.models import load_model
    from geomerase.core.sampling import sample, to_uint8
    from geomerase.core.trainer import resolve_device

    models: dict[str, Any] = {}
    out = {}
    for a in arms:
        if a.model_dir not in models:
            m = load_model(a.model_dir).to(resolve_device(device))
            m.set_attention_backend(backend)
            models[a.model_dir] = m
        scfg = replace(sampler_cfg, guidance_scale=a.guidance_scale)
        out[a.name] = to_uint8(sample(models[a.model_dir], a.prompts, a.negatives, seeds, scfg, neg_weights=a.weights))
    return out


def progress_file(run_dir: str | Path) -> str:
    """Where a training run logs its loss rows (``step,...``): the demo's progress source."""
    return str(Path(run_dir) / "loss.csv")
