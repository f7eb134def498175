"""The stages of the demo and the erasing benchmark as picklable jobs for :func:`geomerase.distributed.dag.run_dag`.

Every job writes its outputs atomically (:func:`geomerase.data.shards.atomic_open`) or returns a
small result, so an interrupted run resumes from what was written.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from geomerase.core.train_metrics import HISTORY_FILE
from geomerase.data.shards import atomic_write


# -- jobs ------------------------------------------------------------------------------------
def build_icd_job(concept: str, n: int, ratio: float, size: int, seed: int, out: str,
                  sizes: str = "default") -> float:
    """Write one ICD split (overlay size profile ``sizes``); returns seconds."""
    from geomerase.data.icd import build_icd

    t = time.time()
    build_icd(concept, n, ratio, size, seed, out, progress=False, sizes=sizes)
    return time.time() - t


def patch_classifier_job(train_glob: str, res: int, grid: int, steps: int, seed: int, out_dir: str, concept: str,
                         width: int = 16, role: str = "annotator", calibration_share: float = 0.1,
                         hold_back: str = "last", degrade_seed: int = 0) -> float:
    """Train a patch classifier (the annotator, or the ICR scorer: another split, width and seed) on
    ground-truth coverage, calibrate its decision threshold on the ``hold_back`` ('first' or 'last')
    ``calibration_share`` of its split (half of it degraded with ``degrade_seed``, as generated images
    are) and save it; returns seconds."""
    from geomerase.core.classifiers import (PatchClassifierConfig, calibrate_threshold, coverage_targets,
                                            save_classifier, train_patch_classifier)
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    ds = InMemoryDataset(train_glob, res)
    pcfg = PatchClassifierConfig(resolution=res, grid=grid, width=width)
    cov = coverage_targets(ds.metas, ds.sizes, grid, pcfg.overlap_threshold)
    n_cal = int(len(ds) * calibration_share) if len(ds) >= 20 else 0
    if hold_back not in ("first", "last"):
        raise ValueError(f"hold_back must be 'first' or 'last', got {hold_back!r}")
    fit, cal_part = (slice(n_cal, None), slice(0, n_cal)) if hold_back == "first" else \
        (slice(0, len(ds) - n_cal), slice(len(ds) - n_cal, None))
    pc = train_patch_classifier(pcfg, ds.images[fit], cov[fit], steps=steps, batch=32, seed=seed, progress=False)
    cal = calibrate_threshold(pc, ds.images[cal_part], cov[cal_part], degrade_seed=degrade_seed) if n_cal else {}
    save_classifier(pc, out_dir, {"concept": concept, "role": role, "calibration": {**cal, "n_images": n_cal}})
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


def progress_file(run_dir: str | Path) -> str:
    """Where a training run logs its loss rows (``step,...``): the runner's progress source."""
    return str(Path(run_dir) / HISTORY_FILE)


def annotate_job(train_glob: str, classifier_dir: str, concept: str, concept_name: str, grid: int,
                 out_dir: str) -> dict:
    """Annotate the training shards with the patch classifier; returns the manifest totals."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.classifiers import load_classifier
    from geomerase.core.detectors import PatchClassifierDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer

    pc, _ = load_classifier(classifier_dir)
    annotator = Annotator(PatchClassifierDetector(concept, pc),
                          GeometryConfig(grid=grid, overlap_threshold=pc.cfg.overlap_threshold),
                          build_tokenizer(grid), concept_name)
    return annotate_shards(annotator, train_glob, out_dir, progress=False)["totals"]


def esd_job(model_dir: str, images_glob: str, cfg_dict: dict, out_dir: str, device: str) -> float:
    """ESD fine-tune of the model in ``model_dir`` (x_t from ``images_glob`` when the source is data)."""
    from geomerase.core.esd import ESDConfig, run_esd
    from geomerase.core.models import load_model
    from geomerase.core.trainer import resolve_device
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    cfg = ESDConfig(**cfg_dict)
    model = load_model(model_dir)
    images = InMemoryDataset(images_glob, model.resolution).images if cfg.xt_source == "data" else None
    torch.manual_seed(cfg.seed)
    run_esd(model.to(resolve_device(device)), cfg, out_dir, images)
    return time.time() - t


@dataclass
class ArmSpec:
    """One sampling arm of one model."""

    name: str
    """File stem of the arm's samples (e.g. ``np`` or ``geom@1.5``)."""
    prompts: list[str]
    """One prompt per sample."""
    negatives: list[str]
    """Negative prompt mixture."""
    weights: list[float]
    """Its weights."""
    guidance_scale: float
    """CFG scale."""
    sld_concept: str | None = None
    """When set, SLD guidance away from this prompt (with ``sld``)."""
    sld: dict = field(default_factory=dict)
    """SLDConfig fields."""

    @property
    def cost(self) -> int:
        """UNet rows per denoising step: the prompts, one copy per negative prompt, one for SLD."""
        return len(self.prompts) * (1 + len(self.negatives) + (1 if self.sld_concept else 0))


def sample_job(model_dir: str, device: str, backend: str, arms: list[ArmSpec], seeds: list[int], steps: int,
               batch_size: int, out_dir: str) -> dict[str, float]:
    """Sample each arm with the same seeds (one per prompt); :func:`samples_path` holds its ``(N, 3, R, R)``
    uint8 images.

    Arms whose file exists are skipped (the file name carries a digest of the settings, so only
    samples made with the same ones are). Returns seconds per arm sampled.
    """
    from geomerase.core.guidance import SLDConfig, SLDGuidance
    from geomerase.core.models import load_model
    from geomerase.core.sampling import SamplerConfig, sample, to_uint8
    from geomerase.core.trainer import resolve_device

    model = None
    out: dict[str, float] = {}
    for arm in arms:
        path = samples_path(out_dir, arm, model_dir, seeds, steps)
        if path.exists():
            continue
        if model is None:
            model = load_model(model_dir).to(resolve_device(device))
            model.set_attention_backend(backend)
        t = time.time()
        hook = SLDGuidance(arm.sld_concept, SLDConfig(**arm.sld)) if arm.sld_concept else None
        scfg = SamplerConfig(steps=steps, guidance_scale=arm.guidance_scale, batch_size=batch_size)
        imgs = sample(model, arm.prompts, arm.negatives, seeds[:len(arm.prompts)], scfg, neg_weights=arm.weights,
                      guidance=hook)
        save_images(to_uint8(imgs), path)
        out[arm.name] = time.time() - t
    return out


def samples_path(out_dir: str | Path, arm: ArmSpec, model_dir: str, seeds: list[int], steps: int) -> Path:
    """The file of one arm's samples: ``<arm name>-<digest>.safetensors``, the digest over everything
    that decides the images (model folder, prompts, negatives and weights, CFG scale, SLD, the seeds
    used and the DDIM steps), so a rerun with other settings never reuses stale samples."""
    blob = json.dumps([asdict(arm), str(model_dir), list(seeds[:len(arm.prompts)]), steps], sort_keys=True)
    return Path(out_dir) / f"{arm.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}.safetensors"


def save_images(images: torch.Tensor, path: str | Path) -> None:
    """Write ``(N, 3, R, R)`` uint8 samples to ``path`` (safetensors, atomically)."""
    from safetensors.torch import save

    atomic_write(path, save({"images": images.contiguous()}))


def load_images(path: str | Path) -> torch.Tensor:
    """``(N, 3, R, R)`` uint8 samples written by :func:`save_images`."""
    from safetensors.torch import load_file

    return load_file(str(path))["images"]


def balance(arms: Sequence[ArmSpec], bins: int) -> list[list[ArmSpec]]:
    """Split arms into at most ``bins`` groups of similar cost (largest first, into the lightest bin)."""
    groups: list[list[ArmSpec]] = [[] for _ in range(max(1, bins))]
    load = [0] * len(groups)
    for a in sorted(arms, key=lambda a: -a.cost):
        i = load.index(min(load))
        groups[i].append(a)
        load[i] += a.cost
    return [g for g in groups if g]
