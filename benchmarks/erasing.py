"""``geomerase bench erasing``: Geom-Erasing against plain fine-tuning, NP, SLD and ESD.

For each concept (qr, watermark, text):

1. data: an ICD training split (ratio of images with the concept) and a held-out split of
   unseen scenes; shared by all concepts, a concept-free training split (the oracle's data)
   and the held-out scenes without the concept (FID reference; their captions are the
   held-out prompts, since an ICD index renders the same scene for every concept and ratio);
2. classifiers, each on its own split (never the training split): the *annotator* (patch
   classifier, width 16), the *ICR scorer* (a second patch classifier, width 32, another seed
   and another calibration share: annotation and scoring do not share a detector; OpenCV and
   Tesseract cannot read 32-64 px samples) and the attribute classifier (prompt fidelity; its
   penultimate features are the FID space);
3. annotation of the training split with the annotator (location tokens);
4. fine-tunes of the concept's base (``pretrained``), same budget and seed: ``plain`` (clean
   captions), ``existence`` (caption + name), ``geom`` (caption + name + location tokens),
   ``geom_reweight`` (+ region re-weighting), ``oracle`` (concept-free data; shared by the
   concepts with the same base), then from the plain model ``esd`` (ESD-x on the name) and ``geom_mr`` (model removal: plain frozen,
   location-token rows trained on the annotated captions);
5. sampling with the same seeds of the held-out captions and of open prompts (the empty
   prompt and generic ones) under the arms of :data:`ARMS`, plus an ICR-vs-guidance sweep
   (geom vs NP) on held-out captions, plus oracle samples on other seeds that calibrate the
   scorer's false-positive rate on generated images (``scorer_fpr``);
6. scoring and the report (:mod:`geomerase.benchmarks.erasing_report`).

This module holds the configuration (arms, presets) and where a run's files live;
:mod:`geomerase.benchmarks.erasing_run` plans the stages as one DAG and runs them side by side (one
1-thread process per core), skipping those whose outputs exist, so a rerun resumes.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geomerase.core.config import ConfigError, from_dict, parse_overrides, set_dotted
from geomerase.core.guidance import SLD_PRESETS
from geomerase.core.models import MODEL_SIZES
from geomerase.data.concepts import SIZE_PROFILES

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
    overlay_sizes: str = "default"
    """Overlay size profile of the concept splits (``data.concepts.SIZE_PROFILES``): ``lowres``
    draws watermarks and text large enough to read at 64 px; concepts the profile does not list
    keep their default sizes (and their data stays byte-identical)."""
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
    attn_align_weight: float = 0.0
    """Cross-attention alignment weight (``train.attn_align_weight``) of the fine-tunes whose captions
    carry location tokens (geom, geom_reweight, geom_mr). 0: the paper's recipe, as in the published
    cpu run; the demo's geom fine-tune uses 3 (benchmarks/results/demo_cpu/NOTES.md); 1 on this
    preset's qr made geom worse and geom_mr better (benchmarks/results/erasing_cpu/NOTES.md)."""
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
        if self.overlay_sizes not in SIZE_PROFILES:
            raise ConfigError(f"overlay_sizes {self.overlay_sizes!r} not in {sorted(SIZE_PROFILES)}")
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
        if self.attn_align_weight < 0:
            raise ConfigError(f"attn_align_weight must be >= 0, got {self.attn_align_weight}")
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

    def sizes(self, c: str) -> str:
        """Overlay size profile of concept ``c``'s splits: ``overlay_sizes`` if it lists ``c``."""
        return self.overlay_sizes if c in SIZE_PROFILES[self.overlay_sizes] else "default"

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
    # read them), sized for <= 75 min for all three concepts on the 2-core CPU (benchmarks/results/
    # erasing_cpu has the measured run). 256 samples per arm and prompt set (every held-out caption):
    # with 128, qr's open-prompt intervals of geom vs SLD/ESD and of geom_mr vs NP/SLD touched although
    # the point estimates differed 2-5x (erasing_cpu/NOTES.md). The ablation arms (existence,
    # geom_reweight) run in the gpu preset and on request (``arms=``).
    "cpu": dict(pretrained=dict(BASES), image_size=128, n_train=2000, steps=800, samples=256,
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


# -- where a run's files live ---------------------------------------------------------------------
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
