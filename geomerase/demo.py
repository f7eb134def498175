"""``geomerase demo``: the whole method on the shipped base model, end to end, on a CPU.

1. build four disjoint Implicit Concept Dataset splits (QR codes in about half the images):
   ``train`` (the fine-tuning data), ``heldout`` (unseen scenes: prompts and classifier checks),
   ``annot`` (the annotator's own training data) and ``scorer`` (the ICR and fidelity scorers'
   training data), so neither network is fit on the images it later annotates or scores;
2. train the annotator (a patch classifier, decision threshold calibrated on a held-back tenth of
   its split), the ICR scorer (another patch classifier, other data, other seed) and the
   attribute classifier (prompt fidelity);
3. annotate the training split with the annotator at its calibrated threshold (location tokens in
   the captions) and report the quality of the annotations actually written;
4. fine-tune the shipped base model (``builtin:base32``, the stand-in for a pretrained Stable
   Diffusion) twice with the same budget and seed: ``plain`` (clean captions) and ``geom``
   (Geom-Erasing captions; data removal: UNet + location-token rows, text encoder frozen);
5. sample every arm with the same seeds, and the concept-free base model on other seeds: the
   scorer's threshold is raised until it flags at most ``scorer_fpr`` of the base model's samples;
   score ICR and fidelity, write ``metrics.json``, ``report.md``, sample grids and an ICR chart.

Stages run side by side in one process per core (:func:`geomerase.distributed.dag.run_dag`; the
jobs, shared with the erasing benchmark, are :mod:`geomerase.stages`). Each writes its
outputs atomically and is skipped when they exist, so an interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from geomerase.core.captions import CaptionConfig, concept_phrase, negative_mixture
from geomerase.core.classifiers import (PatchClassifier, as_float, bounded_threshold, degraded, labels_to_index,
                                        load_classifier, patch_classifier_quality)
from geomerase.core.config import to_dict
from geomerase.core.geometry import GeometryConfig, GridEncoder, cell_precision_recall
from geomerase.core.lora import LoraConfig
from geomerase.core.metrics import (clearly_below, difference_interval, fidelity, fidelity_chance, icr, icr_bar_chart,
                                    sample_grid)
from geomerase.core.models import ModelConfig
from geomerase.core.trainer import RunConfig, TrainConfig, resolve_device
from geomerase.data.loader import DataConfig, InMemoryDataset, annotated_cells
from geomerase.data.scenes import BACKGROUNDS, SHAPES
from geomerase.data.shards import atomic_write, iter_samples
from geomerase.demo_report import render_report
from geomerase.distributed.dag import Job, Task, pool_shape, run_dag
from geomerase.stages import (ArmSpec, annotate_job, attribute_classifier_job, balance, build_icd_job, load_images,
                              patch_classifier_job, progress_file, sample_job, samples_path, train_model_job)

log = logging.getLogger("geomerase.demo")

RES = 32
"""Pixel resolution of the demo's model, annotator and scorers."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Output folder."""
    concept: str = "qr"
    """Concept key of the ICD."""
    concept_name: str = "qr code"
    """Phrase in captions and negative prompts."""
    n_train: int = 3000
    """Training images (the fine-tuning data, annotated by the annotator)."""
    n_heldout: int = 600
    """Held-out images (unseen scenes): classifier checks and sampling prompts."""
    n_aux: int = 1500
    """Images in each of the annotator's and the scorers' own splits (seeds disjoint from the others)."""
    ratio: float = 0.5
    """Share of images carrying the concept."""
    image_size: int = 64
    """ICD render size (area-downsampled to the model's 32 px)."""
    grid: int = 4
    """G: location-token grid."""
    pretrained: str | None = "builtin:base32"
    """Base model both fine-tunes start from (``builtin:NAME`` or a diffusers folder); None: random
    init of ``model_size`` (no concept-free model then: the scorer is not calibrated)."""
    model_size: str = "base32"
    """Registry size when ``pretrained`` is None."""
    steps: int = 1500
    """Fine-tuning steps per model (the two fine-tunes run side by side, one thread each; 1500 steps
    took 735 s (plain) and 814 s (geom, with the alignment loss) of the 1045 s demo,
    benchmarks/results/demo_cpu/NOTES.md)."""
    batch_size: int = 16
    """Diffusion batch size."""
    lr: float = 1e-3
    """UNet learning rate of the fine-tunes (5e-4 with 1000 steps: plain ICR 0.047 instead of 0.156)."""
    loc_lr: float = 5e-3
    """Learning rate of the location-token rows (the geom fine-tune)."""
    samples: int = 64
    """Samples per arm."""
    guidance_scale: float = 3.0
    """CFG scale."""
    sample_steps: int = 15
    """DDIM steps."""
    geom_negative: str = "geom"
    """Negative-prompt kind of the Geom-Erasing arms (see captions.negative_mixture)."""
    extra_negatives: list[str] = field(default_factory=list)
    """Further negative kinds reported beside the main ones (e.g. geom-cells, geom-seen; each
    negative prompt costs one more UNet evaluation per sampling step)."""
    uncond_prior: bool = True
    """Both fine-tunes keep the base's unconditional branch (``train.uncond_prior``: caption-dropped
    rows regress on the frozen base), as a large pretrained model's stays under a short fine-tune."""
    open_prompts: list[str] = field(default_factory=lambda: ["", "an image", "a picture", "a photo"])
    """Open prompts of the ``open_*`` arms, cycled over the samples (the benchmark's open set)."""
    captions: CaptionConfig = field(default_factory=lambda: CaptionConfig(
        mode="geom", concept_first_prob=0.2, concept_only_prob=0.1, shuffle_cells=True, dropout=0.1))
    """Caption variants of the geom model. Without the concept-only variant (``concept_only_prob=0``) two
    fine-tunes that differ only in thread count gave open-prompt ICR 0.000 and 0.234 under the geometric
    negative (10%, without the alignment loss: 0.188), so one run per recipe does not decide it
    (benchmarks/results/demo_cpu/NOTES.md, "Run-to-run variation")."""
    classifier_steps: int = 800
    """Patch / attribute classifier training steps."""
    scorer_fpr: float = 0.05
    """Largest share of the concept-free base model's samples the ICR scorer may flag (its threshold
    is raised until it does not flag more)."""
    seed: int = 0
    """Seed of everything."""
    threads: int = 2
    """torch CPU threads in all (split evenly between the worker processes)."""
    workers: int = 2
    """Processes that run independent stages side by side on the CPU; 1 runs everything in this process."""
    prepare_only: bool = False
    """Stop after the data, classifier and annotation stages (no diffusion training)."""
    guidance_sweep: list[float] = field(default_factory=list)
    """Extra CFG scales at which the open-prompt arms are re-scored (ICR-vs-guidance curve)."""
    reweight_alpha: float | None = None
    """Region re-weighting alpha of the geom fine-tune (None: plain MSE)."""
    attn_align_weight: float = 3.0
    """Cross-attention alignment weight of the geom fine-tune (``train.attn_align_weight``; 0: off).
    Open prompts under the geometric negative, seeds 0 / 1: 0.188 / 0.172 at 0, 0.000 / 0.016 at 1 and 3.
    Binding (cells of ``qr code <cells>``, P / R), seed 0: 0.314 / 0.616 at 0, 0.609 / 0.703 at 1,
    0.706 / 0.867 at 3; seed 1: 0.299 / 0.538, 0.345 / 0.433, 0.386 / 0.513
    (benchmarks/results/demo_cpu/NOTES.md, seed_runs.json)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Both fine-tunes train LoRA adapters on the UNet's attention projections instead of the whole
    UNet (``lora.rank > 0``; ``lr`` is then the adapters' learning rate), as ``train.lora``."""
    device: str = "cpu"
    """Diffusion training/sampling device ('auto' uses a GPU when present); classifiers stay on the CPU."""
    attention_backend: str = "sdpa"
    """UNet attention backend (sdpa, triton, xformers, math; 'diffusers' keeps diffusers' own processor)."""


@dataclass
class _Layout:
    """Where the demo's artefacts live under ``root``."""

    root: Path

    def glob(self, split: str, concept: str) -> str:
        return str(self.root / "icd" / split / f"icd-{concept}-*.tar")

    def classifier(self, name: str) -> Path:
        return self.root / "classifiers" / name

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def annotated(self) -> Path:
        return self.root / "annotated"

    @property
    def samples(self) -> Path:
        return self.root / "samples"


def _splits(cfg: DemoConfig) -> dict[str, tuple[int, int]]:
    """Split name -> (images, seed); the seeds never overlap, so no image is in two splits."""
    return {"train": (cfg.n_train, cfg.seed), "heldout": (cfg.n_heldout, cfg.seed + 1000),
            "annot": (cfg.n_aux, cfg.seed + 2000), "scorer": (cfg.n_aux, cfg.seed + 3000)}


def _train_rc(cfg: DemoConfig, run_dir: Path, shards: str, captions: CaptionConfig,
              reweight_alpha: float | None, align_weight: float = 0.0) -> RunConfig:
    """A data-removal fine-tune of ``cfg.steps`` (resumes from ``run_dir``'s latest checkpoint). From a
    base model the text encoder stays frozen and only the UNet and the location rows train (the paper's
    data removal); from random init the whole text encoder trains too."""
    steps = cfg.steps
    model = ModelConfig(size=cfg.model_size, pretrained=cfg.pretrained, grid=cfg.grid, seed=cfg.seed,
                        attention_backend=cfg.attention_backend)
    return RunConfig(out_dir=str(run_dir), model=model, data=DataConfig(shards=shards, batch_size=cfg.batch_size),
                     captions=captions,
                     train=TrainConfig(mode="data-removal", train_text_encoder=cfg.pretrained is None,
                                       max_steps=steps, lr=cfg.lr, loc_lr=cfg.loc_lr, seed=cfg.seed,
                                       reweight_alpha=reweight_alpha, attn_align_weight=align_weight,
                                       warmup_steps=min(50, max(steps // 10, 1)),
                                       uncond_prior=cfg.uncond_prior and cfg.pretrained is not None,
                                       lora=cfg.lora,
                                       device=cfg.device, log_every=25, save_every=max(steps // 4, 1)),
                     resume="latest")


def _prepare_plan(cfg: DemoConfig, lay: _Layout) -> dict[str, Task]:
    """Data splits, the three classifiers, annotation and (unless ``prepare_only``) the two fine-tunes."""
    c = cfg.concept
    tasks: dict[str, Task] = {}
    for name, (n, seed) in _splits(cfg).items():
        out = lay.root / "icd" / name
        tasks[f"data/{name}"] = Task(Job(build_icd_job, (c, n, cfg.ratio, cfg.image_size, seed, str(out))),
                                     outputs=(str(out / f"icd-{c}-meta.json"),), cost=n / 500)
    steps = cfg.classifier_steps
    cls = {"annotator": (patch_classifier_job, (lay.glob("annot", c), RES, cfg.grid, steps, cfg.seed,
                                                str(lay.classifier("annotator")), c), "annot"),
           "scorer": (patch_classifier_job, (lay.glob("scorer", c), RES, cfg.grid, steps, cfg.seed + 1,
                                             str(lay.classifier("scorer")), c, 16, "icr-scorer"), "scorer"),
           "attributes": (attribute_classifier_job, (lay.glob("scorer", c), RES, steps, cfg.seed,
                                                     str(lay.classifier("attributes")), list(BACKGROUNDS),
                                                     list(SHAPES)), "scorer")}
    for name, (fn, args, split) in cls.items():
        tasks[f"classifier/{name}"] = Task(Job(fn, args), deps=(f"data/{split}",),
                                           outputs=(str(lay.classifier(name) / "model.safetensors"),), cost=steps / 200)
    tasks["annotate"] = Task(Job(annotate_job, (lay.glob("train", c), str(lay.classifier("annotator")), c,
                                                cfg.concept_name, cfg.grid, str(lay.annotated))),
                             deps=("classifier/annotator", "data/train"),
                             outputs=(str(lay.annotated / "_manifest.json"),), cost=cfg.n_train / 500)
    if cfg.prepare_only:
        return tasks
    shards = str(lay.annotated / "*.tar")
    for name, caps, alpha, align in (("plain", CaptionConfig(mode="clean", dropout=cfg.captions.dropout), None, 0.0),
                                     ("geom", cfg.captions, cfg.reweight_alpha, cfg.attn_align_weight)):
        rc = _train_rc(cfg, lay.model(name), shards, caps, alpha, align)
        tasks[f"train/{name}"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.steps),
                                      deps=("annotate",), outputs=(f"{rc.out_dir}/model/geomerase.json",),
                                      cost=cfg.steps / 10)
    return tasks


def _annotation_quality(lay: _Layout, annotator: PatchClassifier) -> dict:
    """Cell precision/recall of the annotations written on the training split against its ground
    truth, at the grid and overlap threshold the annotator wrote them with (``annotate_job``)."""
    enc = GridEncoder(GeometryConfig(grid=annotator.cfg.grid, overlap_threshold=annotator.cfg.overlap_threshold))
    written, truth = [], []
    for s in iter_samples(str(lay.annotated / "*.tar")):
        written.append(list(s.meta.get("annotation", {}).get("cells", [])))
        truth.append(enc.cells_from_boxes(s.meta.get("boxes", []), *s.image.size))
    return cell_precision_recall(written, truth)


def _patch_quality(pc: PatchClassifier, ds: InMemoryDataset, seed: int) -> dict:
    """Cell and image precision/recall of ``pc`` at its current threshold on clean and degraded images."""
    return patch_classifier_quality(pc, ds.images, ds.metas, ds.sizes, seed)[""]


def _scorer_threshold(scorer: PatchClassifier, base_images: torch.Tensor | None, fpr: float) -> dict:
    """Raise the scorer's F1-calibrated threshold until it flags at most ``fpr`` of the concept-free
    base model's samples (:func:`~geomerase.core.classifiers.bounded_threshold`); sets it on the scorer."""
    out = {"f1_threshold": scorer.threshold, "fpr_bound": fpr}
    if base_images is None:
        return {**out, "threshold": scorer.threshold, "calibrated": False}
    b = bounded_threshold(scorer, base_images, fpr)
    scorer.cfg.decision_threshold = b["threshold"]
    return {**out, "threshold": b["threshold"], "calibrated": True, "n_base_samples": b["n"],
            "base_flagged": b["flagged"]}


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    lay = _Layout(Path(cfg.out))
    atomic_write(lay.root / "demo_config.json", json.dumps(to_dict(cfg), indent=1))
    workers, threads = pool_shape(resolve_device(cfg.device), cfg.workers, cfg.threads)
    timings: dict[str, float] = {}

    # 1-4. data, classifiers, annotation and the two fine-tunes: one dependency graph --------------
    t = time.time()
    run_dag(_prepare_plan(cfg, lay), workers, threads, desc="prepare + fine-tune", timings=timings)
    held_ds = InMemoryDataset(lay.glob("heldout", cfg.concept), RES)
    annotator_pc, annotator_meta = load_classifier(lay.classifier("annotator"))
    scorer, scorer_meta = load_classifier(lay.classifier("scorer"))
    ac, _ = load_classifier(lay.classifier("attributes"))
    quality = {"annotator_heldout": _patch_quality(annotator_pc, held_ds, cfg.seed + 7),
               "annotations_written": _annotation_quality(lay, annotator_pc)}
    bgs, shapes = list(BACKGROUNDS), list(SHAPES)
    hbg = labels_to_index([m["attributes"]["background"] for m in held_ds.metas], bgs, "heldout")
    hsh = labels_to_index([m["attributes"]["shape"] for m in held_ds.metas], shapes, "heldout")
    pbg, psh = ac.predict(as_float(held_ds.images))
    dbg, dsh = ac.predict(degraded(held_ds.images, seed=cfg.seed + 11))
    attr_quality = {"clean": fidelity(pbg, psh, hbg, hsh), "degraded": fidelity(dbg, dsh, hbg, hsh)}
    timings["prepare_train"] = time.time() - t
    if cfg.prepare_only:
        return {"quality": quality, "attribute_classifier": attr_quality, "timings": timings}

    # 5. sample and score ----------------------------------------------------------------------------
    t = time.time()
    images, arms, probe_cells, neg = _sample_all(cfg, lay, held_ds, workers, threads)
    scorer_cal = _scorer_threshold(scorer, images.get("base"), cfg.scorer_fpr)
    quality["scorer_heldout"] = _patch_quality(scorer, held_ds, cfg.seed + 7)
    results, fids = _score(cfg, lay.root, images, arms, probe_cells, scorer, ac, hbg, hsh)
    binding = binding_probes(str(lay.model("geom") / "model"), held_ds, cfg)
    timings["sample_score"] = time.time() - t
    metrics = _metrics(cfg, results, fids, quality, attr_quality, scorer_cal, binding, neg,
                       {"annotator": annotator_meta.get("calibration", {}),
                        "scorer": scorer_meta.get("calibration", {})}, (workers, threads), timings, t_start)
    atomic_write(lay.root / "metrics.json", json.dumps(metrics, indent=1))
    report = render_report(metrics)
    atomic_write(lay.root / "report.md", report)
    print(report)
    return metrics


def _arms(cfg: DemoConfig, prompts: list[str], seen: list[list[int]]) -> tuple[dict, list[list[int]]]:
    """``{arm: (model, prompts, negative kind)}`` and the probe's asked-for cell sets."""
    n = cfg.samples
    open_ = open_prompt_list(cfg)
    arms = {
        "plain": ("plain", prompts, "none"), "plain_np": ("plain", prompts, "name"),
        "geom_noneg": ("geom", prompts, "none"), "geom": ("geom", prompts, cfg.geom_negative),
        "open_noneg": ("geom", open_, "none"), "open_np": ("geom", open_, "name"),
        "open_geom": ("geom", open_, cfg.geom_negative),
        # The paper's NP baseline on open prompts: the normally fine-tuned model with the concept's name.
        "open_plain": ("plain", open_, "none"), "open_plain_np": ("plain", open_, "name"),
    }
    # Token-binding probes: ask the geom model *for* the concept at cell sets seen in training, as the
    # bare phrase (the captions' concept-only variant) and appended to a held-out caption (their usual
    # form). If the location tokens were learned, the scorer finds the concept in the asked-for cells.
    probe_cells = [seen[(i * 7919) % len(seen)] for i in range(n)] if seen else [[0]] * n
    arms["probe_geom"] = ("geom", [concept_phrase(cfg.concept_name, c) for c in probe_cells], "none")
    arms["probe_scene"] = ("geom", [f"{p}, {concept_phrase(cfg.concept_name, c)}" for p, c in zip(prompts, probe_cells)],
                           "none")
    for kind in cfg.extra_negatives:
        arms[f"geom[{kind}]"] = ("geom", prompts, kind)
        arms[f"open_geom[{kind}]"] = ("geom", open_, kind)
    return arms, probe_cells


def open_prompt_list(cfg: DemoConfig) -> list[str]:
    """``cfg.samples`` open prompts: ``cfg.open_prompts`` cycled."""
    return [cfg.open_prompts[i % len(cfg.open_prompts)] for i in range(cfg.samples)]


def _sample_all(cfg: DemoConfig, lay: _Layout, held_ds: InMemoryDataset, workers: int, threads: int):
    """Every arm with the same seeds (plus the base model's calibration samples on other seeds), as
    sampling jobs of similar cost per model; each arm's images are written once (resume). Returns
    images, the arm table, the probe cells and the negative mixtures."""
    n = cfg.samples
    prompts = [r.caption for r in held_ds.records][:n]
    seen = annotated_cells(str(lay.annotated / "*.tar"), cfg.grid)
    neg = {kind: negative_mixture(kind, cfg.concept_name, cfg.grid, seen)
           for kind in ["none", "name", cfg.geom_negative, *cfg.extra_negatives]}
    arms, probe_cells = _arms(cfg, prompts, seen)
    specs: dict[str, list[ArmSpec]] = {"plain": [], "geom": []}
    for arm, (mname, ps, kind) in arms.items():
        specs[mname].append(ArmSpec(arm, ps, *neg[kind], cfg.guidance_scale))
    for scale in cfg.guidance_sweep:
        for arm, kind in (("open_noneg", "none"), ("open_np", "name"), ("open_geom", cfg.geom_negative)):
            specs["geom"].append(ArmSpec(f"{arm}@{scale}", open_prompt_list(cfg), *neg[kind], scale))
    seeds = list(range(10_000, 10_000 + n))
    jobs = [(str(lay.model(m) / "model"), group, seeds) for m, arm_specs in specs.items()
            for group in balance(arm_specs, workers)]
    if cfg.pretrained:
        # The concept-free base model, half held-out prompts and half open ones, on seeds no arm uses.
        from geomerase.core.builtin import resolve_pretrained

        jobs.append((resolve_pretrained(cfg.pretrained), [ArmSpec("base", prompts + open_prompt_list(cfg), [""], [1.0],
                                                                  cfg.guidance_scale)],
                     list(range(20_000, 20_000 + 2 * n))))
    # Each arm's file is named by what made it, so a rerun with other sampling settings resamples.
    files = {a.name: str(samples_path(lay.samples, a, model_dir, sd, cfg.sample_steps))
             for model_dir, group, sd in jobs for a in group}
    tasks = {f"sample/{i}": Task(Job(sample_job, (model_dir, cfg.device, cfg.attention_backend, group, sd,
                                                  cfg.sample_steps, 64, str(lay.samples))),
                                 outputs=tuple(files[a.name] for a in group),
                                 cost=sum(a.cost for a in group) * cfg.sample_steps / 1000)
             for i, (model_dir, group, sd) in enumerate(jobs)}
    run_dag(tasks, workers, threads, desc="sample")
    images = {name: load_images(path) for name, path in files.items()}
    return images, arms, probe_cells, neg


def _score(cfg: DemoConfig, out: Path, images: dict[str, torch.Tensor], arms: dict, probe_cells: list[list[int]],
           scorer: PatchClassifier, ac, hbg: torch.Tensor, hsh: torch.Tensor) -> tuple[dict, dict]:
    """ICR of every arm with the calibrated scorer, fidelity of the prompted arms, sample grids."""
    n = cfg.samples
    results, fids = {}, {}
    for arm in [*arms, *sorted(k for k in images if "@" in k or k == "base")]:
        imgs = images[arm]
        cells = scorer.cells(as_float(imgs))
        results[arm] = icr([bool(c) for c in cells])
        mname, ps, kind = arms.get(arm, ("base" if arm == "base" else "geom", [""], arm.split("@")[0]))
        if arm.startswith("probe"):
            results[arm]["cells_vs_asked"] = cell_precision_recall(cells, probe_cells)
        elif (arm in arms and ps[0]) or arm == "base":  # the base's first n samples use the held-out prompts
            pb, psh_ = ac.predict(as_float(imgs[:n]))
            fids[arm] = fidelity(pb, psh_, hbg[:n], hsh[:n])
        sample_grid(imgs[:64], out / "grids" / f"{arm.replace('[', '_').replace(']', '')}.png", cells[:64], cfg.grid,
                    title=f"{arm}: model={mname} negative={kind} ICR={results[arm]['icr']:.2f}")
    geom_neg = {a for a, (_, _, kind) in arms.items() if kind.startswith("geom")}
    icr_bar_chart({k: v for k, v in results.items() if "@" not in k}, out / "icr.png",
                  title=f"ICR per arm ({cfg.concept_name}, n={n}; green = geometric negative)", highlight=geom_neg)
    return results, fids


def _metrics(cfg: DemoConfig, results: dict, fids: dict, quality: dict, attr_quality: dict, scorer_cal: dict,
             binding: dict, neg: dict, calibration: dict, workers: tuple[int, int], timings: dict,
             t_start: float) -> dict:
    ic = {k: v["icr"] for k, v in results.items()}
    fp, fg, chance = fids["plain"]["fidelity"], fids["geom"]["fidelity"], fidelity_chance(len(BACKGROUNDS), len(SHAPES))
    probe = results["probe_geom"]["cells_vs_asked"]
    targets = {
        "scorer calibrated on the base model": bool(scorer_cal.get("calibrated")),
        "icr.plain >= 0.4": ic["plain"] >= 0.4,
        "icr.geom <= 0.2 x icr.plain": ic["geom"] <= 0.2 * ic["plain"],
        "icr.open_geom <= 0.3 x icr.open_noneg": ic["open_geom"] <= 0.3 * ic["open_noneg"],
        "icr.open_geom < icr.open_np (95% intervals disjoint)": clearly_below(results["open_geom"], results["open_np"]),
        "probe cells precision and recall >= 0.5": probe["precision"] >= 0.5 and probe["recall"] >= 0.5,
        "fidelity.plain >= 0.6": fp >= 0.6,
        "fidelity.geom within 0.05 of plain": abs(fg - fp) <= 0.05,
    }
    metrics = {
        "icr": ic,
        "icr_detail": results,
        "fidelity": {"plain": fp, "geom": fg, "base": fids.get("base", {}).get("fidelity"), "chance": chance,
                     "detail": fids},
        "targets": targets,
        "scorer_calibration": scorer_cal,
        "classifier_calibration": calibration,
        "quality": quality,
        "attribute_classifier": attr_quality,
        "icr_differences": {f"{a} - {b}": difference_interval(results[a], results[b])
                            for a, b in (("open_geom", "open_np"), ("open_geom", "open_plain_np"))},
        "icr_vs_guidance": {k: v["icr"] for k, v in results.items() if "@" in k},
        "binding": binding,
        "negatives": {k: {"prompts": v[0], "weights": v[1]} for k, v in neg.items()},
        "n_samples": cfg.samples, "seconds": time.time() - t_start, "timings": timings,
        "workers": workers[0], "threads_per_worker": workers[1],
        "config": to_dict(cfg),
    }
    targets["demo seconds <= 1200"] = metrics["seconds"] <= 1200
    return metrics


def binding_probes(model_dir: str, held_ds: InMemoryDataset, cfg: DemoConfig, n: int = 64) -> dict:
    """One-step probes of the geom model on clean held-out images (``core.probes``): where the
    concept tag for random cells changes the x0 prediction, and (pooled-text UNets) which
    conditioning path carries the caption."""
    from geomerase.core.models import load_model
    from geomerase.core.probes import conditioning_paths, random_cell_sets, tag_localisation

    m = load_model(model_dir)
    m.unet.eval()
    m.text_encoder.eval()
    idx = [i for i, meta in enumerate(held_ds.metas) if not meta.get("boxes")][:n]
    images, captions = as_float(held_ds.images[idx]), [held_ds.records[i].caption for i in idx]
    out = {"n": len(idx), "tag_localisation": tag_localisation(
        m, images, captions, cfg.concept_name, random_cell_sets(len(idx), cfg.grid, cfg.seed), seed=cfg.seed)}
    if getattr(m.unet, "add_embedding", None) is not None:
        out["conditioning_paths"] = conditioning_paths(m, images, captions, seed=cfg.seed)
    return out
