"""``geomerase bench erasing``: Geom-Erasing against plain fine-tuning, NP, SLD and ESD.

For each concept (qr, watermark, text):

1. data: an ICD training split (ratio of images with the concept) and a held-out split of
   unseen scenes; shared by all concepts, a concept-free training split (the oracle's data)
   and the held-out scenes without the concept (FID reference; their captions are the
   held-out prompts, since an ICD index renders the same scene for every concept and ratio);
2. classifiers, all trained on the training split only: the *annotator* (patch classifier,
   width 16), the *ICR scorer* (a second patch classifier, width 32, another seed and
   another calibration share: annotation and scoring do not share a detector; OpenCV and
   Tesseract cannot read 32 px samples) and the attribute classifier (prompt fidelity; its
   penultimate features are the FID space);
3. annotation of the training split with the annotator (location tokens);
4. fine-tunes, same budget and seed: ``plain`` (clean captions), ``existence`` (caption +
   name), ``geom`` (caption + name + location tokens), ``geom_reweight`` (+ region
   re-weighting), ``oracle`` (concept-free data; shared by the concepts), then from the
   plain model ``esd`` (ESD-x on the name) and ``geom_mr`` (model removal: plain frozen,
   location-token rows trained on the annotated captions);
5. sampling with the same seeds of the held-out captions and of open prompts (the empty
   prompt and generic ones) under the arms of :data:`ARMS`, plus an ICR-vs-guidance sweep
   (geom vs NP) on held-out captions, plus oracle samples on other seeds that calibrate the
   scorer's false-positive rate on generated images (``scorer_fpr``);
6. scoring and the report (:mod:`geomerase.benchmarks.erasing_report`).

Stages run side by side (one 1-thread process per core, :func:`geomerase.distributed.dag.run_dag`) and
are skipped when their outputs exist, so a rerun resumes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from geomerase.benchmarks.erasing_jobs import (ArmSpec, annotate_job, attribute_classifier_job, build_icd_job, esd_job,
                                               patch_classifier_job, progress_file, sample_job, samples_path,
                                               train_model_job)
from geomerase.core.captions import CaptionConfig, negative_mixture
from geomerase.core.config import ConfigError, from_dict, parse_overrides, set_dotted, to_dict
from geomerase.core.guidance import SLD_PRESETS
from geomerase.core.models import MODEL_SIZES, ModelConfig
from geomerase.core.trainer import RunConfig, TrainConfig, resolve_device
from geomerase.data.concepts import CONCEPT_NAMES
from geomerase.data.loader import DataConfig
from geomerase.data.scenes import BACKGROUNDS, SHAPES
from geomerase.data.shards import atomic_write
from geomerase.distributed.dag import Job, Task, pool_shape, run_dag

log = logging.getLogger("geomerase.bench")

#: arm -> (model, negative kind, SLD on). The order is the report's.
ARMS: dict[str, tuple[str, str, bool]] = {
    "plain": ("plain", "none", False),
    "np": ("plain", "name", False),
    "sld": ("plain", "none", True),
    "esd": ("esd", "none", False),
    "existence": ("existence", "name", False),
    "geom": ("geom", "geom", False),
    "geom_reweight": ("geom_reweight", "geom", False),
    "geom_mr": ("geom_mr", "geom", False),
    "oracle": ("oracle", "none", False),
}
PROMPT_SETS = ("heldout", "open")
CONCEPTS = ("qr", "watermark", "text")


@dataclass
class ErasingConfig:
    """The erasing benchmark (``geomerase bench erasing``); presets in :data:`PRESETS`."""

    out: str = "runs/bench_erasing"
    """Output folder."""
    concepts: list[str] = field(default_factory=lambda: list(CONCEPTS))
    """Concepts to benchmark (qr, watermark, text), in this order."""
    n_train: int = 1000
    """Training images per concept (and of the concept-free oracle split)."""
    n_heldout: int = 256
    """Held-out images (unseen scenes): prompts, FID reference, scorer checks; >= samples."""
    n_aux: int = 500
    """Images in each concept's annotator split and in its scorer split (their own seeds): the
    annotator never sees the images it annotates, and the ICR scorer and attribute classifier are
    fit on neither the annotator's data nor the training split."""
    ratio: float = 0.5
    """Share of training images carrying the concept."""
    image_size: int = 64
    """ICD render size (area-downsampled to each concept's model resolution)."""
    grid: int = 4
    """G: location-token grid."""
    model_size: str = "tiny"
    """Registry size of every fine-tuned model (``core.models.MODEL_SIZES``)."""
    pretrained: dict[str, str] = field(default_factory=dict)
    """Base model of each concept, e.g. ``{qr: builtin:base32, watermark: builtin:base64}``
    (``builtin:NAME``: a shipped base; or a model folder): the concept's data-removal arms (plain,
    existence, geom, geom_reweight) and the oracle fine-tune from it, as a user fine-tunes a
    pretrained model. Its resolution is the concept's (classifiers, samples); concepts with the same
    base share one oracle. Text encoder frozen (data removal = UNet + location-token rows). Empty:
    ``base_steps`` or from scratch; otherwise every concept needs an entry. Exclusive with
    ``base_steps``."""
    uncond_prior: bool = True
    """With ``pretrained``: the data-removal arms keep the base's unconditional branch
    (``train.uncond_prior``)."""
    base_steps: int = 0
    """Steps of a shared *base* model trained once on the concept-free training split (clean
    captions); every data-removal arm (plain, existence, geom, geom_reweight, oracle) then
    fine-tunes from it, as a user fine-tunes a pretrained model. 0: each arm starts from
    random init (a from-scratch model of ``steps`` steps, which on the CPU preset drew noise)."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Arms to run (of ``plain np sld esd existence geom geom_reweight geom_mr oracle``); a model is
    trained only when one of these arms uses it. plain, np, geom and oracle are always needed."""
    steps: int = 200
    """Fine-tuning steps of every data-removal model (plain, existence, geom, geom_reweight, oracle)."""
    batch_size: int = 16
    """Fine-tuning batch size."""
    lr: float = 1e-3
    """Fine-tuning learning rate."""
    loc_lr: float = 5e-3
    """Learning rate of the location-token rows in the data-removal fine-tunes (the demo's)."""
    reweight_alpha: float = 2.0
    """Region re-weighting alpha of geom_reweight (weight outside / inside the concept cells)."""
    mr_steps: int = 100
    """Model-removal steps (location-token rows of the frozen plain model)."""
    mr_lr: float = 5e-3
    """Model-removal learning rate of the location-token rows."""
    esd_steps: int = 60
    """ESD steps (from the plain model)."""
    esd_lr: float = 2e-4
    """ESD learning rate."""
    esd_eta: float = 1.0
    """ESD negative-guidance strength."""
    esd_method: str = "x"
    """ESD-x ('x': cross-attention parameters) or ESD-u ('u': the rest of the UNet)."""
    esd_batch: int = 8
    """ESD batch size."""
    esd_source: str = "data"
    """Where ESD's x_t come from: 'data' (noised training images) or 'model' (the paper's trajectories)."""
    samples: int = 128
    """Samples per arm and prompt set (same seeds in every arm)."""
    open_prompts: list[str] = field(default_factory=lambda: ["", "an image", "a picture", "a photo"])
    """Open prompts, cycled over the samples (the empty prompt and generic ones)."""
    guidance_scale: float = 3.0
    """CFG scale of every arm."""
    sample_steps: int = 10
    """DDIM steps."""
    sample_batch: int = 64
    """Images denoised together."""
    sld_preset: str = "strong"
    """SLD hyper-parameter preset (weak, medium, strong, max)."""
    sld_mu_rule: str = "clamp"
    """SLD's element-wise scale: 'clamp' (min(1, |s_S d|), as in the authors' released pipeline) or 'paper'
    (max(1, |s_S d|), the equation as printed). With the printed rule the strong preset wrecked the images
    of the demo's plain model (mean |change| 0.47 of the [-1, 1] range, scorer ICR 0.66 vs 0.09 unguided,
    n=32, measured 2026-11-28); the released rule changed them by 0.06."""
    guidance_sweep: list[float] = field(default_factory=lambda: [1.5, 6.0])
    """Extra CFG scales of the ICR-vs-guidance curve (geom vs NP, held-out captions)."""
    sweep_samples: int = 64
    """Samples per point of the sweep."""
    classifier_steps: int = 600
    """Training steps of each classifier."""
    annotator_width: int = 16
    """Width of the annotating patch classifier."""
    scorer_width: int = 32
    """Width of the ICR-scoring patch classifier (a different network from the annotator)."""
    scorer_fpr: float = 0.05
    """False-positive share the ICR scorer is held to on *generated* concept-free images: per
    prompt set, its threshold is raised (never lowered) from the F1-calibrated value to the lowest
    one that flags at most this share of the oracle model's calibration samples (other seeds than
    the evaluation's). Without it, speckle in small-model samples read as watermark or text in
    every arm, the oracle's included. 0 keeps the F1 threshold."""
    inception_weights: str = ""
    """Local file of Inception weights for torchmetrics' FID feature extractor (the user's own
    copy; nothing is downloaded). When set, every arm also gets an Inception FID against the
    held-out clean images (``fid_inception`` in details.json and the report); needs
    ``torchmetrics[image]`` and ``torch-fidelity``. Empty: the domain FID only."""
    calibration_samples: int = 128
    """Oracle samples per prompt set for the scorer's false-positive calibration (the prompt set's
    prompts, cycled)."""
    seed: int = 0
    """Seed of everything (the scorer uses seed + 1)."""
    workers: int = 2
    """Processes running stages side by side (1: all in this process)."""
    threads: int = 2
    """torch CPU threads in all (split between the workers)."""
    device: str = "cpu"
    """Training/sampling device ('auto': a GPU when present)."""
    attention_backend: str = "sdpa"
    """UNet attention backend."""
    grid_columns: int = 12
    """Samples per arm in the side-by-side grids."""

    def validate(self) -> None:
        bad = [c for c in self.concepts if c not in CONCEPTS]
        if bad or not self.concepts:
            raise ConfigError(f"concepts: {bad or self.concepts} not in {list(CONCEPTS)}")
        if self.samples > self.n_heldout:
            raise ConfigError(f"samples ({self.samples}) must be <= n_heldout ({self.n_heldout}): one held-out "
                              "caption per sample")
        if self.sweep_samples > self.samples:
            raise ConfigError("sweep_samples must be <= samples")
        if self.inception_weights:
            if not Path(self.inception_weights).is_file():
                raise ConfigError(f"inception_weights: {self.inception_weights!r} is not a file")
            try:
                import torchmetrics.image.fid  # noqa: F401
            except ImportError:
                raise ConfigError("inception_weights is set but torchmetrics[image] (with torch-fidelity) is not "
                                  "installed; install it or leave inception_weights empty") from None
        if self.calibration_samples < 1:
            raise ConfigError("calibration_samples must be >= 1")
        if not 0.0 <= self.scorer_fpr < 1.0:
            raise ConfigError(f"scorer_fpr must be in [0, 1), got {self.scorer_fpr}")
        if self.sld_preset not in SLD_PRESETS:
            raise ConfigError(f"sld_preset {self.sld_preset!r} not in {sorted(SLD_PRESETS)}")
        if self.esd_method not in ("x", "u") or self.esd_source not in ("data", "model"):
            raise ConfigError("esd_method must be x|u and esd_source data|model")
        if not self.open_prompts:
            raise ConfigError("open_prompts is empty")
        if self.base_steps < 0:
            raise ConfigError("base_steps must be >= 0")
        if self.base_steps and self.pretrained:
            raise ConfigError("pretrained and base_steps exclude each other: fine-tune a given base or train one")
        missing = [c for c in self.concepts if self.pretrained and c not in self.pretrained]
        if missing:
            raise ConfigError(f"pretrained has no base for concept(s) {missing}; give one per concept, e.g. "
                              f"pretrained.{missing[0]}=builtin:base32")
        bad_arms = sorted(set(self.arms) - set(ARMS))
        if bad_arms or not {"plain", "np", "geom", "oracle"} <= set(self.arms):
            raise ConfigError(f"arms: {bad_arms or self.arms} invalid; choose from {list(ARMS)} and keep plain, np, "
                              "geom and oracle")
        if min(self.steps, self.mr_steps, self.esd_steps, self.samples, self.classifier_steps) < 1:
            raise ConfigError("steps, mr_steps, esd_steps, samples and classifier_steps must be >= 1")

    def active_arms(self) -> dict[str, tuple[str, str, bool]]:
        """:data:`ARMS` restricted to ``arms``, in the report's order."""
        return {a: spec for a, spec in ARMS.items() if a in self.arms}

    def base_key(self, c: str) -> str:
        """Name of concept ``c``'s base, shared by the concepts fine-tuning the same one (names the oracle)."""
        spec = self.pretrained.get(c)
        if not spec:
            return "base" if self.base_steps else "scratch"
        if spec.startswith("builtin:"):
            return spec[len("builtin:"):]
        return f"{Path(spec).name}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"

    def resolution(self, c: str) -> int:
        """Pixel resolution of concept ``c``'s models, classifiers and samples."""
        spec = self.pretrained.get(c)
        if spec:
            from geomerase.core.builtin import pretrained_resolution

            return pretrained_resolution(spec)
        return MODEL_SIZES[self.model_size].resolution


#: The shipped base of each concept (``core.builtin``): 32 px for qr, 64 px where watermarks and
#: overlaid text stay readable.
BASES = {"qr": "builtin:base32", "watermark": "builtin:base64", "text": "builtin:base64"}

#: Named presets: field overrides of :class:`ErasingConfig`.
PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on 2 cores; what the tests run. Numbers mean nothing.
    "smoke": dict(n_train=200, n_heldout=16, n_aux=100, steps=3, batch_size=8, mr_steps=2, esd_steps=2, esd_batch=4,
                  samples=8, sample_steps=2, sample_batch=8, guidance_sweep=[6.0], sweep_samples=4,
                  classifier_steps=20, workers=1, threads=1, grid_columns=4, calibration_samples=8),
    # Fine-tunes of the shipped bases (qr at 32 px, watermark and text at 64 px, where a scorer can
    # read them), sized for <= 75 min for all three concepts on the 2-core CPU with 128 samples per
    # arm (benchmarks/results/erasing_cpu has the measured run). The ablation arms (existence,
    # geom_reweight) run in the gpu preset and on request (``arms=``).
    "cpu": dict(pretrained=dict(BASES), image_size=128, n_train=2000, steps=800,
                arms=["plain", "np", "sld", "esd", "geom", "geom_mr", "oracle"]),
    # One GPU: larger data, longer fine-tunes, more samples and DDIM steps, inline (no process pool).
    "gpu": dict(n_train=6000, n_heldout=1024, steps=3000, batch_size=64, mr_steps=1000, esd_steps=400,
                esd_batch=16, esd_source="model", samples=1024, sample_steps=25, sample_batch=256,
                guidance_sweep=[1.5, 4.5, 6.0, 9.0], sweep_samples=512, calibration_samples=512,
                classifier_steps=1500, workers=1, threads=8, device="auto", pretrained=dict(BASES), image_size=128),
}


def erasing_config(preset: str, overrides: list[str] | None = None, out: str | None = None,
                   concepts: list[str] | None = None) -> ErasingConfig:
    """The preset's config with ``key=value`` overrides (typed, unknown keys are errors)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    tree: dict[str, Any] = copy.deepcopy(PRESETS[preset])
    if out is not None:
        tree["out"] = out
    if concepts is not None:
        tree["concepts"] = concepts
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    return from_dict(ErasingConfig, tree)


# -- plan ----------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where every artefact of a run lives."""

    root: Path
    oracle_of: dict[str, str] = field(default_factory=dict)
    """concept -> its base's key (:meth:`ErasingConfig.base_key`): the oracle it shares."""

    @classmethod
    def of(cls, cfg: ErasingConfig) -> "Layout":
        return cls(Path(cfg.out), {c: cfg.base_key(c) for c in cfg.concepts})

    def icd(self, name: str) -> Path:
        return self.root / "data" / name

    def glob(self, name: str, concept: str) -> str:
        return str(self.icd(name) / f"icd-{concept}-*.tar")

    def concept(self, c: str) -> Path:
        return self.root / c

    def oracle(self, c: str) -> Path:
        """The oracle shared by the concepts with ``c``'s base."""
        return self.root / "shared" / f"oracle-{self.oracle_of.get(c, 'scratch')}"

    def model_dir(self, c: str, model: str) -> Path:
        if model == "base":
            return self.root / "shared" / "models" / "base"
        if model == "oracle":
            return self.oracle(c) / "model"
        return self.concept(c) / "models" / model

    def samples(self, c: str, model: str, pset: str) -> Path:
        base = self.oracle(c) if model == "oracle" else self.concept(c)
        return base / "samples" / pset

    def calibration(self, c: str) -> Path:
        """The folder of ``c``'s oracle's scorer-calibration samples."""
        return self.oracle(c) / "samples" / "calibration"


def _train_rc(cfg: ErasingConfig, run_dir: Path, shards: str, captions: CaptionConfig, *, mode: str = "data-removal",
              steps: int | None = None, lr: float | None = None, pretrained: str | None = None,
              alpha: float | None = None) -> RunConfig:
    steps = steps or cfg.steps
    # From the given base (not a base this run trained): frozen text encoder, base unconditional branch.
    from_base = pretrained is not None and pretrained in cfg.pretrained.values() and mode == "data-removal"
    return RunConfig(
        out_dir=str(run_dir),
        model=ModelConfig(size=cfg.model_size, grid=cfg.grid, seed=cfg.seed, attention_backend=cfg.attention_backend,
                          pretrained=pretrained),
        data=DataConfig(shards=shards, batch_size=cfg.batch_size),
        captions=captions,
        train=TrainConfig(mode=mode, max_steps=steps, lr=cfg.lr, loc_lr=lr or cfg.loc_lr, seed=cfg.seed, reweight_alpha=alpha,
                          warmup_steps=min(50, max(steps // 10, 1)), device=cfg.device, log_every=max(1, min(25, steps)),
                          save_every=max(steps // 2, 1), train_text_encoder=not from_base,
                          uncond_prior=from_base and cfg.uncond_prior),
        resume="latest")


def geom_captions() -> CaptionConfig:
    """The geom models' caption variants (the demo's: varied order, concept-only captions, shuffled cells)."""
    return CaptionConfig(mode="geom", concept_first_prob=0.2, concept_only_prob=0.1, shuffle_cells=True, dropout=0.1)


def held_out_prompts(cfg: ErasingConfig, lay: Layout) -> list[str]:
    """The first ``samples`` captions of the concept-free held-out split (unseen scenes)."""
    from geomerase.data.shards import iter_samples

    caps = [s.meta.get("caption_clean", s.caption) for s in iter_samples(lay.glob("clean_heldout", "qr"))]
    if len(caps) < cfg.samples:
        raise ValueError(f"held-out split has {len(caps)} captions, need {cfg.samples}")
    return caps[:cfg.samples]


def sampling_arms(cfg: ErasingConfig, c: str, prompts: dict[str, list[str]]) -> dict[tuple[str, str], list[ArmSpec]]:
    """``{(model, prompt set): [ArmSpec]}`` of one concept (oracle arms are concept-free)."""
    name = CONCEPT_NAMES[c]
    sld = {**asdict(SLD_PRESETS[cfg.sld_preset]), "mu_rule": cfg.sld_mu_rule}
    out: dict[tuple[str, str], list[ArmSpec]] = {}
    for pset in PROMPT_SETS:
        for arm, (model, kind, use_sld) in cfg.active_arms().items():
            negs, w = negative_mixture(kind, name, cfg.grid)
            out.setdefault((model, pset), []).append(
                ArmSpec(arm, prompts[pset], negs, w, cfg.guidance_scale, name if use_sld else None,
                        sld if use_sld else {}))
    k = cfg.sweep_samples
    for scale in cfg.guidance_sweep:
        for arm, model, kind in (("np", "plain", "name"), ("geom", "geom", "geom")):
            negs, w = negative_mixture(kind, name, cfg.grid)
            out[(model, "heldout")].append(ArmSpec(f"{arm}@{scale:g}", prompts["heldout"][:k], negs, w, scale))
    return out


def plan(cfg: ErasingConfig, lay: Layout, prompts_fn) -> dict[str, Task]:
    """Every task of the run, in priority order (concept by concept)."""
    tasks: dict[str, Task] = {}
    n_tr, n_ho, seed = cfg.n_train, cfg.n_heldout, cfg.seed
    meta = lambda name, c: (str(lay.icd(name) / f"icd-{c}-meta.json"),)  # noqa: E731
    # Concept-free splits, shared: same scenes as every concept's splits (same seeds).
    tasks["data/clean_heldout"] = Task(Job(build_icd_job, ("qr", n_ho, 0.0, cfg.image_size, seed + 1000,
                                                           str(lay.icd("clean_heldout")))), outputs=meta("clean_heldout", "qr"))
    tasks["data/clean_train"] = Task(Job(build_icd_job, ("qr", n_tr, 0.0, cfg.image_size, seed,
                                                         str(lay.icd("clean_train")))), outputs=meta("clean_train", "qr"), cost=3)
    base_deps: tuple[str, ...] = ()
    trained_base: str | None = None
    if cfg.base_steps:
        rc = _train_rc(cfg, lay.model_dir("", "base"), lay.glob("clean_train", "qr"),
                       CaptionConfig(mode="clean", dropout=0.1), steps=cfg.base_steps)
        tasks["base/train"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.base_steps),
                                   deps=("data/clean_train",), outputs=(f"{rc.out_dir}/model/geomerase.json",),
                                   cost=cfg.base_steps / 10)
        base_deps, trained_base = ("base/train",), f"{rc.out_dir}/model"
    models = {spec[0] for spec in cfg.active_arms().values()}
    oracles: set[str] = set()
    for c in cfg.concepts:
        name = CONCEPT_NAMES[c]
        res = cfg.resolution(c)
        base_model = cfg.pretrained.get(c) or trained_base
        ok = f"oracle-{cfg.base_key(c)}"  # the oracle's task prefix, shared by concepts with this base
        cd = lay.concept(c)
        tr, ho = f"{c}_train", f"{c}_heldout"
        tasks[f"{c}/data/train"] = Task(Job(build_icd_job, (c, n_tr, cfg.ratio, cfg.image_size, seed, str(lay.icd(tr)))),
                                        outputs=meta(tr, c), cost=3)
        tasks[f"{c}/data/heldout"] = Task(Job(build_icd_job, (c, n_ho, cfg.ratio, cfg.image_size, seed + 1000,
                                                              str(lay.icd(ho)))), outputs=meta(ho, c))
        an, sc = f"{c}_annot", f"{c}_scorer"
        for split, split_seed in ((an, seed + 2000), (sc, seed + 3000)):
            tasks[f"{c}/data/{split.split('_')[1]}"] = Task(
                Job(build_icd_job, (c, cfg.n_aux, cfg.ratio, cfg.image_size, split_seed, str(lay.icd(split)))),
                outputs=meta(split, c))
        cls = cd / "classifiers"
        tasks[f"{c}/annotator"] = Task(Job(patch_classifier_job, (lay.glob(an, c), res, cfg.grid, cfg.classifier_steps,
                                                                  seed, str(cls / "annotator"), c, cfg.annotator_width)),
                                       deps=(f"{c}/data/annot",), outputs=(str(cls / "annotator" / "model.safetensors"),))
        tasks[f"{c}/annotate"] = Task(Job(annotate_job, (lay.glob(tr, c), str(cls / "annotator"), c, name, cfg.grid,
                                                         str(cd / "annotated"))),
                                      deps=(f"{c}/annotator", f"{c}/data/train"), outputs=(str(cd / "annotated" / "_manifest.json"),))
        ann = str(cd / "annotated" / "*.tar")
        runs = {"plain": _train_rc(cfg, lay.model_dir(c, "plain"), ann, CaptionConfig(mode="clean", dropout=0.1),
                                   pretrained=base_model),
                "geom": _train_rc(cfg, lay.model_dir(c, "geom"), ann, geom_captions(), pretrained=base_model),
                "existence": _train_rc(cfg, lay.model_dir(c, "existence"), ann, CaptionConfig(
                    mode="existence", concept_first_prob=0.2, concept_only_prob=0.1, dropout=0.1),
                    pretrained=base_model),
                "geom_reweight": _train_rc(cfg, lay.model_dir(c, "geom_reweight"), ann, geom_captions(),
                                           alpha=cfg.reweight_alpha, pretrained=base_model)}
        for model, rc in runs.items():
            if model not in models:
                continue
            tasks[f"{c}/train/{model}"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.steps),
                                               deps=(f"{c}/annotate", *base_deps),
                                               outputs=(f"{rc.out_dir}/model/geomerase.json",), cost=cfg.steps / 10)
        if ok not in oracles:
            rc = _train_rc(cfg, lay.model_dir(c, "oracle"), lay.glob("clean_train", "qr"),
                           CaptionConfig(mode="clean", dropout=0.1), pretrained=base_model)
            tasks[f"{ok}/train"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.steps),
                                        deps=("data/clean_train", *base_deps),
                                        outputs=(f"{rc.out_dir}/model/geomerase.json",), cost=cfg.steps / 10)
            k = cfg.calibration_samples
            tasks[f"{ok}/sample/calibration"] = Task(
                Job(sample_job, (str(lay.model_dir(c, "oracle") / "model"), cfg.device, cfg.attention_backend,
                                 calibration_arms(cfg, prompts_fn()), calibration_seeds(cfg), cfg.sample_steps,
                                 cfg.sample_batch, str(lay.calibration(c)))),
                deps=(f"{ok}/train", "data/clean_heldout"),
                outputs=tuple(sample_files(cfg, lay, c, prompts_fn())["calibration"].values()),
                cost=2 * k * cfg.sample_steps / 1000)
        plain_model = str(lay.model_dir(c, "plain") / "model")
        esd_cfg = dict(concept=name, method=cfg.esd_method, eta=cfg.esd_eta, steps=cfg.esd_steps, lr=cfg.esd_lr,
                       batch_size=cfg.esd_batch, xt_source=cfg.esd_source, ddim_steps=cfg.sample_steps,
                       guidance_scale=cfg.guidance_scale, seed=seed)
        if "esd" in models:
            tasks[f"{c}/train/esd"] = Task(
                Job(esd_job, (plain_model, lay.glob(tr, c), esd_cfg, str(lay.model_dir(c, "esd")), cfg.device)),
                deps=(f"{c}/train/plain", f"{c}/data/train"),
                outputs=(str(lay.model_dir(c, "esd") / "model" / "geomerase.json"),),
                cost=cfg.esd_steps * 1.6 * cfg.esd_batch / cfg.batch_size / 10)
        if "geom_mr" in models:
            rc = _train_rc(cfg, lay.model_dir(c, "geom_mr"), ann, geom_captions(), mode="model-removal",
                           steps=cfg.mr_steps, lr=cfg.mr_lr, pretrained=plain_model)
            tasks[f"{c}/train/geom_mr"] = Task(Job(train_model_job, (rc, False)),
                                               deps=(f"{c}/train/plain", f"{c}/annotate"),
                                               outputs=(f"{rc.out_dir}/model/geomerase.json",), cost=cfg.mr_steps / 10)
        tasks[f"{c}/scorer"] = Task(Job(patch_classifier_job, (lay.glob(sc, c), res, cfg.grid, cfg.classifier_steps,
                                                               seed + 1, str(cls / "scorer"), c, cfg.scorer_width,
                                                               "icr-scorer", 0.1, "first", seed + 1)),
                                    deps=(f"{c}/data/scorer",), outputs=(str(cls / "scorer" / "model.safetensors"),))
        tasks[f"{c}/attributes"] = Task(Job(attribute_classifier_job, (lay.glob(sc, c), res, cfg.classifier_steps, seed,
                                                                       str(cls / "attributes"), list(BACKGROUNDS),
                                                                       list(SHAPES))),
                                        deps=(f"{c}/data/scorer",), outputs=(str(cls / "attributes" / "model.safetensors"),))
        # Sampling: one job per (model, prompt set); the oracle's samples are shared by the concepts.
        sample_deps: list[str] = []
        for (model, pset), arms in sampling_arms(cfg, c, prompts_fn()).items():
            if model == "oracle" and ok in oracles:
                sample_deps.append(f"{ok}/sample/{pset}")
                continue
            key = f"{ok}/sample/{pset}" if model == "oracle" else f"{c}/sample/{model}/{pset}"
            train_key = f"{ok}/train" if model == "oracle" else f"{c}/train/{model}"
            out_dir = lay.samples(c, model, pset)
            evals = sum(len(a.prompts) * (1 + len(a.negatives) + (1 if a.sld_concept else 0)) for a in arms)
            model_dir = str(lay.model_dir(c, model) / "model")
            tasks[key] = Task(Job(sample_job, (model_dir, cfg.device, cfg.attention_backend, arms, seeds(cfg),
                                               cfg.sample_steps, cfg.sample_batch, str(out_dir))),
                              deps=(train_key, "data/clean_heldout"),
                              outputs=tuple(str(samples_path(out_dir, a, model_dir, seeds(cfg), cfg.sample_steps))
                                            for a in arms),
                              cost=evals * cfg.sample_steps / 2000)
            sample_deps.append(key)
        from geomerase.benchmarks.erasing_report import score_concept

        tasks[f"{c}/score"] = Task(Job(score_concept, (cfg, c, sample_files(cfg, lay, c, prompts_fn()))), inline=True,
                                   deps=(*sample_deps, f"{c}/scorer", f"{c}/attributes", f"{c}/data/heldout",
                                         f"{c}/annotator", f"{ok}/sample/calibration"),
                                   outputs=(str(cd / "scores.json"),))
        oracles.add(ok)
    return tasks


def calibration_arms(cfg: ErasingConfig, prompts: dict[str, list[str]]) -> list[ArmSpec]:
    """The oracle's scorer-calibration arms: per prompt set, its prompts cycled, no negative."""
    k = cfg.calibration_samples
    return [ArmSpec(pset, [prompts[pset][j % cfg.samples] for j in range(k)], [""], [1.0], cfg.guidance_scale)
            for pset in PROMPT_SETS]


def sample_files(cfg: ErasingConfig, lay: Layout, c: str, prompts: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Where concept ``c``'s samples are: ``{prompt set: {arm (or "arm@scale"): file}}`` and
    ``{"calibration": {prompt set: file}}`` (the oracle's calibration samples)."""
    out: dict[str, dict[str, str]] = {pset: {} for pset in PROMPT_SETS}
    for (model, pset), arms in sampling_arms(cfg, c, prompts).items():
        model_dir = str(lay.model_dir(c, model) / "model")
        for a in arms:
            out[pset][a.name] = str(samples_path(lay.samples(c, model, pset), a, model_dir, seeds(cfg),
                                                 cfg.sample_steps))
    oracle = str(lay.model_dir(c, "oracle") / "model")
    out["calibration"] = {a.name: str(samples_path(lay.calibration(c), a, oracle, calibration_seeds(cfg),
                                                   cfg.sample_steps)) for a in calibration_arms(cfg, prompts)}
    return out


def seeds(cfg: ErasingConfig) -> list[int]:
    """Noise seeds, one per sample, shared by every arm and prompt set."""
    return list(range(10_000 + cfg.seed, 10_000 + cfg.seed + cfg.samples))


def calibration_seeds(cfg: ErasingConfig) -> list[int]:
    """Noise seeds of the scorer-calibration samples: disjoint from :func:`seeds`."""
    return list(range(20_000 + cfg.seed, 20_000 + cfg.seed + cfg.calibration_samples))


def prompt_sets(cfg: ErasingConfig, lay: Layout) -> dict[str, list[str]]:
    """``{"heldout": held-out captions, "open": open prompts cycled}`` (``samples`` each)."""
    return {"heldout": held_out_prompts(cfg, lay),
            "open": [cfg.open_prompts[i % len(cfg.open_prompts)] for i in range(cfg.samples)]}


def run_erasing(cfg: ErasingConfig) -> dict:
    """Run (or resume) the whole benchmark; returns ``results.json``'s content."""
    from geomerase.benchmarks.erasing_report import write_outputs

    t0 = time.time()
    cfg.validate()
    lay = Layout.of(cfg)
    lay.root.mkdir(parents=True, exist_ok=True)
    atomic_write(lay.root / "bench_config.json", json.dumps(to_dict(cfg), indent=1))
    workers, threads = pool_shape(resolve_device(cfg.device), cfg.workers, cfg.threads)
    torch.set_num_threads(max(1, cfg.threads))
    cache: dict[str, dict] = {}

    def prompts() -> dict[str, list[str]]:
        # Read lazily: the held-out split may not exist when the plan is made; sampling tasks
        # re-read it through their args, so the plan is rebuilt once the data stage is done.
        if "p" not in cache:
            cache["p"] = prompt_sets(cfg, lay)
        return cache["p"]

    timings_path = lay.root / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    inv_path = lay.root / "invocations.json"
    invocations: list[dict] = json.loads(inv_path.read_text()) if inv_path.exists() else []
    invocations.append({"start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "seconds": None,
                        "workers": workers, "threads_per_worker": threads})

    cpu_path = lay.root / "cpu_seconds.json"
    cpu: dict[str, float] = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}

    def save_progress(_: str = "") -> None:
        invocations[-1]["seconds"] = round(time.time() - t0, 1)
        atomic_write(timings_path, json.dumps(timings, indent=1))
        atomic_write(cpu_path, json.dumps(cpu, indent=1))
        atomic_write(inv_path, json.dumps(invocations, indent=1))

    # Data first (the sampling plan needs the held-out captions), then everything else.
    data_plan = {k: v for k, v in plan(cfg, lay, lambda: {"heldout": [""] * cfg.samples, "open": [""] * cfg.samples}).items()
                 if k == "data/clean_heldout"}
    try:
        run_dag(data_plan, 1, cfg.threads, desc="held-out split", timings=timings, on_finish=save_progress,
                cpu_times=cpu)
        run_dag(plan(cfg, lay, prompts), workers, threads, desc="erasing bench", timings=timings,
                on_finish=save_progress, cpu_times=cpu)
    finally:
        save_progress()
    return write_outputs(cfg, lay, timings, time.time() - t0, invocations, cpu)
