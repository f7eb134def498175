"""Several implicit concepts in one training set: ``python -m geomerase.benchmarks.mixed_concepts``.

A mixed ICD (``qr+watermark+text``: each concept in ``ratio`` of the images, independently, so
some images carry two or three) is annotated by three detectors at once (one patch classifier
per concept, each trained on its own single-concept split, never on the images it annotates),
captioned with one phrase per concept found (``..., watermark <l3> <l4>, text <l12>``), and
fine-tuned from a shipped base: ``plain`` (clean captions), ``geom`` (Geom-Erasing captions) and
``oracle`` (the concept-free split, for the scorers' false-positive bound). Samples on held-out
captions are scored per concept by a second patch classifier per concept (another split, width
and seed), its threshold held to ``scorer_fpr`` flags on the oracle's samples, with and without
the all-concepts negative prompt (``qr code <l0>…, watermark <l0>…, text <l0>…``) and with each
concept's own geometric negative.

Every stage is a task of one DAG (:func:`geomerase.distributed.dag.run_dag`): a rerun resumes.
Training, classifier and sampling settings are the erasing benchmark's ``cpu`` preset
(:mod:`geomerase.benchmarks.erasing`) unless overridden here.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from geomerase.benchmarks.erasing import ErasingConfig, Layout, erasing_config
from geomerase.benchmarks.erasing_run import _train_rc, calibration_seeds, geom_captions, held_out_prompts, seeds
from geomerase.core.captions import CaptionConfig, negative_mixture
from geomerase.core.classifiers import as_float, bounded_threshold, load_classifier, patch_classifier_quality
from geomerase.core.config import add_config_args, from_dict, to_dict
from geomerase.core.metrics import icr
from geomerase.core.trainer import resolve_device
from geomerase.data.concepts import CONCEPT_NAMES
from geomerase.data.loader import InMemoryDataset
from geomerase.data.shards import atomic_open, atomic_write, iter_samples
from geomerase.distributed.dag import Job, Task, pool_shape, run_dag
from geomerase.stages import (ArmSpec, build_icd_job, load_images, patch_classifier_job, progress_file, sample_job,
                              samples_path, train_model_job)


@dataclass
class MixedConfig:
    """The mixed-concept benchmark."""

    out: str = "runs/bench_mixed"
    """Output folder."""
    concepts: list[str] = field(default_factory=lambda: ["qr", "watermark", "text"])
    """Concepts mixed into one training set."""
    base: str = "builtin:base64"
    """Base model every fine-tune starts from (64 px: watermark and text stay readable)."""
    ratio: float = 0.4
    """Share of training images carrying each concept (independently)."""
    n_train: int = 2000
    """Training images (mixed; also the size of the concept-free oracle split)."""
    n_heldout: int = 256
    """Held-out mixed images (scorer recall) and concept-free ones (prompts); >= samples."""
    samples: int = 64
    """Samples per arm (held-out captions, the same seeds in every arm)."""
    steps: int = 800
    """Fine-tuning steps of each model (plain, geom, oracle)."""
    preset: str = "cpu"
    """Erasing-benchmark preset the training, classifier and sampling settings come from."""
    workers: int = 2
    """Processes running stages side by side."""
    threads: int = 2
    """torch CPU threads in all."""


def erasing_settings(cfg: MixedConfig) -> ErasingConfig:
    """The preset's settings with this run's concepts, base, sizes and seeds."""
    e = erasing_config(cfg.preset, out=cfg.out, concepts=list(cfg.concepts))
    return replace(e, pretrained={c: cfg.base for c in cfg.concepts}, n_train=cfg.n_train, n_heldout=cfg.n_heldout,
                   samples=cfg.samples, steps=cfg.steps, workers=cfg.workers, threads=cfg.threads,
                   calibration_samples=2 * cfg.samples)


def mixed_name(cfg: MixedConfig) -> str:
    """The mixed ICD's concept spec, ``qr+watermark+text``."""
    return "+".join(cfg.concepts)


def _data_tasks(cfg: MixedConfig, e: ErasingConfig, root: Path) -> dict[str, Task]:
    """Mixed train and held-out splits, concept-free train (oracle) and held-out (prompts), and per
    concept an annotator split and a scorer split (their own seeds: disjoint scenes)."""
    mix, size, s = mixed_name(cfg), e.image_size, e.seed
    specs = {"train": (mix, cfg.n_train, cfg.ratio, s), "heldout": (mix, cfg.n_heldout, cfg.ratio, s + 1000),
             "clean_train": ("qr", cfg.n_train, 0.0, s + 5000), "clean_heldout": ("qr", cfg.n_heldout, 0.0, s + 6000)}
    for k, c in enumerate(cfg.concepts):
        specs[f"{c}_annot"] = (c, e.n_aux, 0.5, s + 2000 + 100 * k)
        specs[f"{c}_scorer"] = (c, e.n_aux, 0.5, s + 3000 + 100 * k)
    out = {}
    for split, (concept, n, ratio, seed) in specs.items():
        d = Layout(root).icd(split)
        out[f"data/{split}"] = Task(Job(build_icd_job, (concept, n, ratio, size, seed, str(d))),
                                    outputs=(str(d / f"icd-{concept}-meta.json"),), cost=n / 500)
    return out


def annotate_mixed_job(train_glob: str, classifier_dirs: dict[str, str], grid: int, out_dir: str) -> dict:
    """Annotate the mixed training split with one patch classifier per concept at once; returns the
    manifest totals."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import MultiDetector, PatchClassifierDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer

    pcs = {c: load_classifier(d)[0] for c, d in classifier_dirs.items()}
    thresholds = {pc.cfg.overlap_threshold for pc in pcs.values()}
    if len(thresholds) != 1:
        raise ValueError(f"the annotators' overlap thresholds differ ({sorted(thresholds)}); one grid encoding")
    det = MultiDetector([PatchClassifierDetector(c, pc) for c, pc in pcs.items()])
    annotator = Annotator(det, GeometryConfig(grid=grid, overlap_threshold=thresholds.pop()), build_tokenizer(grid),
                          {c: CONCEPT_NAMES[c] for c in pcs})
    return annotate_shards(annotator, train_glob, out_dir, progress=False)["totals"]


def _model_tasks(cfg: MixedConfig, e: ErasingConfig, root: Path) -> dict[str, Task]:
    """Classifiers per concept, the annotation, and the plain / geom / oracle fine-tunes."""
    res, g, tasks, lay = e.resolution(cfg.concepts[0]), e.grid, {}, Layout(root)
    cls = {c: root / "classifiers" / c for c in cfg.concepts}
    for c in cfg.concepts:
        tasks[f"{c}/annotator"] = Task(
            Job(patch_classifier_job, (lay.glob(f"{c}_annot", c), res, g, e.classifier_steps, e.seed,
                                       str(cls[c] / "annotator"), c, e.annotator_width)),
            deps=(f"data/{c}_annot",), outputs=(str(cls[c] / "annotator" / "model.safetensors"),))
        tasks[f"{c}/scorer"] = Task(
            Job(patch_classifier_job, (lay.glob(f"{c}_scorer", c), res, g, e.classifier_steps, e.seed + 1,
                                       str(cls[c] / "scorer"), c, e.scorer_width, "icr-scorer", 0.1, "first",
                                       e.seed + 1)),
            deps=(f"data/{c}_scorer",), outputs=(str(cls[c] / "scorer" / "model.safetensors"),))
    ann = root / "annotated"
    tasks["annotate"] = Task(
        Job(annotate_mixed_job, (lay.glob("train", mixed_name(cfg)), {c: str(cls[c] / "annotator") for c in cls},
                                 g, str(ann))),
        deps=("data/train", *(f"{c}/annotator" for c in cfg.concepts)), outputs=(str(ann / "_manifest.json"),))
    runs = {"plain": (str(ann / "*.tar"), CaptionConfig(mode="clean", dropout=0.1), "annotate"),
            "geom": (str(ann / "*.tar"), geom_captions(), "annotate"),
            "oracle": (lay.glob("clean_train", "qr"), CaptionConfig(mode="clean", dropout=0.1), "data/clean_train")}
    for model, (shards, captions, dep) in runs.items():
        rc = _train_rc(e, root / "models" / model, shards, captions, pretrained=cfg.base)
        tasks[f"train/{model}"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), e.steps),
                                       deps=(dep,), outputs=(f"{rc.out_dir}/model/geomerase.json",),
                                       cost=e.steps / 10)
    return tasks


def arms(cfg: MixedConfig, prompts: list[str], e: ErasingConfig) -> dict[str, list[ArmSpec]]:
    """``{model: [ArmSpec]}``: plain and geom without and with the all-concepts negatives, geom with
    each concept's own geometric negative, and the oracle's calibration samples (``calibration``)."""
    names = [CONCEPT_NAMES[c] for c in cfg.concepts]

    def spec(arm: str, kind: str, who: str | list[str]) -> ArmSpec:
        return ArmSpec(arm, prompts, *negative_mixture(kind, who, e.grid), e.guidance_scale)

    out = {"plain": [spec("plain", "none", names), spec("plain_np", "name", names)],
           "geom": [spec("geom_noneg", "none", names), spec("geom_np", "name", names), spec("geom", "geom", names),
                    *(spec(f"geom_{c}", "geom", CONCEPT_NAMES[c]) for c in cfg.concepts)]}
    k = e.calibration_samples
    out["oracle"] = [ArmSpec("calibration", [prompts[j % len(prompts)] for j in range(k)], [""], [1.0],
                             e.guidance_scale)]
    return out


def sample_files(cfg: MixedConfig, e: ErasingConfig, root: Path, prompts: list[str]) -> dict[str, str]:
    """``{arm: samples file}``."""
    out = {}
    for model, specs in arms(cfg, prompts, e).items():
        model_dir = str(root / "models" / model / "model")
        sd = calibration_seeds(e) if model == "oracle" else seeds(e)
        out.update({a.name: str(samples_path(root / "samples", a, model_dir, sd, e.sample_steps)) for a in specs})
    return out


def _sample_tasks(cfg: MixedConfig, e: ErasingConfig, root: Path, prompts: list[str]) -> dict[str, Task]:
    files = sample_files(cfg, e, root, prompts)
    out = {}
    for model, specs in arms(cfg, prompts, e).items():
        sd = calibration_seeds(e) if model == "oracle" else seeds(e)
        out[f"sample/{model}"] = Task(
            Job(sample_job, (str(root / "models" / model / "model"), e.device, e.attention_backend, specs, sd,
                             e.sample_steps, e.sample_batch, str(root / "samples"))),
            deps=(f"train/{model}",), outputs=tuple(files[a.name] for a in specs),
            cost=sum(a.cost for a in specs) * e.sample_steps / 2000)
    return out


def _concept_metas(metas: list[dict], c: str) -> list[dict]:
    """``metas`` with ``boxes`` narrowed to concept ``c``'s (a mixed sample's ``boxes_by_concept``)."""
    return [{**m, "boxes": m.get("boxes_by_concept", {}).get(c, [])} for m in metas]


def annotation_quality(root: Path, cfg: MixedConfig, grid: int) -> dict[str, dict[str, float]]:
    """Cell precision/recall of the annotations written on the training split, per concept, against
    each concept's ground-truth boxes (the cells the captions carry)."""
    from geomerase.core.geometry import GeometryConfig, cell_precision_recall

    out = {}
    samples = list(iter_samples(str(root / "annotated" / "*.tar")))
    for c in cfg.concepts:
        enc = GeometryConfig(grid=grid, overlap_threshold=samples[0].meta["annotation"]["overlap_threshold"]).build()
        pred = [s.meta["annotation"]["concepts"][c]["cells"] for s in samples]
        true = [enc.cells_from_boxes(s.meta["boxes_by_concept"][c], *s.image.size) for s in samples]
        out[c] = cell_precision_recall(pred, true)
    return out


def score(cfg: MixedConfig, e: ErasingConfig, root: Path, prompts: list[str]) -> dict[str, Any]:
    """ICR per concept and arm (each concept's scorer at its false-positive-bounded threshold), the
    scorers' recall on held-out mixed images and the annotation quality; writes ``results.json``."""
    files = sample_files(cfg, e, root, prompts)
    held = InMemoryDataset(Layout(root).glob("heldout", mixed_name(cfg)), e.resolution(cfg.concepts[0]))
    calib = load_images(files["calibration"])
    images = {a: load_images(f) for a, f in files.items() if a != "calibration"}
    flags: dict[str, dict[str, list[bool]]] = {a: {} for a in images}
    per_concept, scorers = {}, {}
    for c in cfg.concepts:
        sc, _ = load_classifier(root / "classifiers" / c / "scorer")
        bound = bounded_threshold(sc, calib, e.scorer_fpr)
        t = sc.cfg.decision_threshold = bound["threshold"]
        q = patch_classifier_quality(sc, held.images, _concept_metas(held.metas, c), held.sizes, e.seed + 7,
                                     {"bound": t})["bound"]
        scorers[c] = {"threshold": t, "f1_threshold": bound["f1_threshold"], "oracle_flagged": bound["flagged"],
                      "recall_degraded": q["images_degraded"]["recall"], "recall_clean": q["images_clean"]["recall"],
                      "precision_degraded": q["images_degraded"]["precision"]}
        per_concept[c] = {}
        for a, imgs in images.items():
            flags[a][c] = [bool(cs) for cs in sc.cells(as_float(imgs))]
            per_concept[c][a] = icr(flags[a][c])
    any_concept = {a: icr([any(fs) for fs in zip(*flags[a].values())]) for a in images}
    out = {"config": to_dict(cfg), "settings": {k: getattr(e, k) for k in (
               "steps", "batch_size", "lr", "loc_lr", "grid", "guidance_scale", "sample_steps", "scorer_fpr",
               "classifier_steps", "image_size", "n_aux", "seed")},
           "icr": per_concept, "icr_any": any_concept, "scorers": scorers,
           "annotation": annotation_quality(root, cfg, e.grid),
           "negatives": {a.name: a.negatives for specs in arms(cfg, prompts, e).values()
                         for a in specs}}
    atomic_write(root / "results.json", json.dumps(out, indent=1))
    return out


def render(out: dict[str, Any], cfg: MixedConfig, seconds: float) -> str:
    """The Markdown report."""
    cs = cfg.concepts
    arm_names = list(out["icr_any"])
    f = lambda r: f"{r['icr']:.3f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})"  # noqa: E731
    lines = [f"# Several concepts in one training set ({mixed_name(cfg)}, {cfg.samples} samples per arm)", "",
             f"Fine-tunes of `{cfg.base}`, {out['settings']['steps']} steps each; each concept in "
             f"{cfg.ratio:.0%} of the {cfg.n_train} training images, independently. Wall time {seconds:.0f} s.", "",
             "| arm | " + " | ".join(f"ICR {c}" for c in cs) + " | any concept |",
             "|---|" + "---|" * (len(cs) + 1)]
    for a in arm_names:
        lines.append(f"| {a} | " + " | ".join(f(out["icr"][c][a]) for c in cs) + f" | {f(out['icr_any'][a])} |")
    lines += ["", "Negative prompts: `plain_np`/`geom_np` name every concept; `geom` is every concept with all "
              "cells in one prompt; `geom_<c>` is that concept's alone.", "",
              "| concept | scorer threshold | oracle samples flagged | scorer recall (held-out, degraded / clean) "
              "| annotation cells P / R |", "|---|---|---|---|---|"]
    for c in cs:
        s, q = out["scorers"][c], out["annotation"][c]
        lines.append(f"| {c} | {s['threshold']:.3f} | {s['oracle_flagged']:.3f} | {s['recall_degraded']:.3f} / "
                     f"{s['recall_clean']:.3f} | {q['precision']:.3f} / {q['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def run(cfg: MixedConfig) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes ``results.json``, ``report.md`` and ``icr.png``."""
    t0 = time.time()
    if len(cfg.concepts) < 2 or len(set(cfg.concepts)) != len(cfg.concepts):
        raise ValueError(f"concepts: need two or more distinct concepts, got {cfg.concepts}")
    if cfg.samples > cfg.n_heldout:
        raise ValueError(f"samples ({cfg.samples}) must be <= n_heldout ({cfg.n_heldout})")
    e = erasing_settings(cfg)
    e.validate()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    workers, threads = pool_shape(resolve_device(e.device), cfg.workers, cfg.threads)
    torch.set_num_threads(max(1, cfg.threads))
    tasks = {**_data_tasks(cfg, e, root), **_model_tasks(cfg, e, root)}
    run_dag(tasks, workers, threads, desc="data, classifiers, fine-tunes")
    prompts = held_out_prompts(e, Layout(root))
    # the first DAG's tasks are done (their outputs exist): listed again only as the samples' dependencies
    run_dag({**tasks, **_sample_tasks(cfg, e, root, prompts)}, workers, threads, desc="sample")
    out = score(cfg, e, root, prompts)
    atomic_write(root / "report.md", render(out, cfg, time.time() - t0))
    _chart(out, cfg, root / "icr.png")
    return out


def _chart(out: dict[str, Any], cfg: MixedConfig, path: Path) -> None:
    """Grouped bars: ICR per arm, one bar per concept, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arm_names = list(out["icr_any"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(arm_names), 3.6), dpi=110)
    w = 0.8 / len(cfg.concepts)
    for k, c in enumerate(cfg.concepts):
        rs = [out["icr"][c][a] for a in arm_names]
        ys = [r["icr"] for r in rs]
        err = [[max(0.0, r["icr"] - r["ci95"][0]) for r in rs], [max(0.0, r["ci95"][1] - r["icr"]) for r in rs]]
        ax.bar([i + (k - (len(cfg.concepts) - 1) / 2) * w for i in range(len(arm_names))], ys, w, yerr=err,
               capsize=2, label=c)
    ax.set_xticks(range(len(arm_names)))
    ax.set_xticklabels(arm_names, rotation=30, ha="right")
    ax.set_ylabel("ICR")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"ICR per concept ({mixed_name(cfg)}, n={cfg.samples})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(ap, MixedConfig, ["out", "base", "ratio", "n_train", "n_heldout", "samples", "steps", "preset",
                                      "workers", "threads"])
    ap.add_argument("--concepts", default="qr,watermark,text", help="comma-separated concepts to mix")
    a = ap.parse_args(argv)
    tree = {k: v for k, v in vars(a).items() if k != "concepts"}
    cfg = from_dict(MixedConfig, {**tree, "concepts": a.concepts.split(",")})
    out = run(cfg)
    print(json.dumps({c: {arm: r["icr"] for arm, r in v.items()} for c, v in out["icr"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
