"""The shipped watermark detector: its build, and its quality on real photographs before vs after.

    python -m geomerase.benchmarks.watermark_detector build [--n 4000 --steps 1500 --recipe v1]  # writes the weights
    python -m geomerase.benchmarks.watermark_detector eval  [--n 160] [--candidate DIR]            # writes the results

``build`` renders ``n`` training images of the wide watermark family (:mod:`geomerase.data.watermarks`,
mixed as its ``RECIPES[--recipe]`` says: ``v1``, the shipped one, half with a watermark; ``v2``, 40%,
over augmented photos, procedural textures and synthetic scenes; 256 px area-downsampled to the
classifier's 128 px), trains a patch classifier (grid 4, 8 px context, width 16; with ``--init DIR``
continuing from that detector's weights) on their cell coverage, calibrates its decision threshold for
cell F1 on a held-back tenth, and writes it in fp16 with a sha256 manifest to
``geomerase/weights/detectors/watermark/`` (``--detector watermark`` loads it when no ``classifier=`` is
given). Needs scikit-image (the ``test`` extra) for the training photos.

``eval`` scores it on real photographs at 512 px (scikit-image's photos that the training never used,
random crops) where half carry an ICD-rule watermark (:func:`geomerase.data.concepts.add_watermark`:
syllable brand names in faces the training never used), against *before*: the patch classifier the
README's defaults give (``geomerase classifier train --concept watermark`` on a 256 px ICD), and
``--candidate DIR``, a detector folder that is not shipped (a row and a threshold sweep of its own). Cell
precision/recall at grid 4, image precision/recall, images per CPU second. Writes
``benchmarks/results/watermark_detector_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from geomerase.benchmarks.common import RESULTS_DIR, environment
from geomerase.data.shards import atomic_dir, atomic_write
from geomerase.data.watermarks import RECIPES, Recipe

RENDER, RES, GRID, CONTEXT, WIDTH = 256, 128, 4, 8, 16
#: the recipe (:data:`geomerase.data.watermarks.RECIPES`) of the shipped weights
SHIPPED_RECIPE = "v1"


def render_training_set(n: int, seed: int, recipe: Recipe | None = None
                        ) -> tuple[torch.Tensor, list[dict], list[tuple[int, int]]]:
    """``n`` images of the wide family drawn as ``recipe`` says (default: the shipped one; marked and
    clean images spread evenly): ``(N, 3, RES, RES)`` uint8, metas with boxes in RES pixels, sizes."""
    from geomerase.data.watermarks import is_marked, render_sample, training_photos

    recipe = recipe or RECIPES[SHIPPED_RECIPE]
    rng, photos = np.random.default_rng(seed), training_photos()
    images, metas = [], []
    for i in range(n):
        img, boxes = render_sample(rng, RENDER, photos, is_marked(i, recipe.clean_share), recipe)
        small = img.resize((RES, RES), Image.BOX)
        images.append(torch.from_numpy(np.asarray(small, np.uint8).copy()).permute(2, 0, 1))
        metas.append({"boxes": [[v * RES / RENDER for v in b] for b in boxes]})
    return torch.stack(images), metas, [(RES, RES)] * n


def build(n: int, steps: int, seed: int, out: Path, recipe: str = SHIPPED_RECIPE, width: int = WIDTH,
          init: Path | None = None, lr: float = 2e-3) -> dict[str, Any]:
    """Train on ``n`` images of ``RECIPES[recipe]`` (the last tenth held back), from scratch or, with
    ``init``, from the weights of an earlier detector folder; calibrate the decision threshold for cell F1
    on that tenth, and write the detector to ``out``; returns its build record."""
    from geomerase.core.checkpoint import write_manifest
    from geomerase.core.classifiers import (PatchClassifierConfig, calibrate_threshold, coverage_targets,
                                            load_classifier, save_classifier, train_patch_classifier)

    t0 = time.time()
    images, metas, sizes = render_training_set(n, seed, RECIPES[recipe])
    cfg = PatchClassifierConfig(resolution=RES, grid=GRID, context=CONTEXT, width=width)
    cov = coverage_targets(metas, sizes, GRID, cfg.overlap_threshold)
    n_cal = n // 10
    t1 = time.time()
    start, started = None, None
    if init is not None:
        start, meta = load_classifier(init)
        started = {"build": meta.get("build"),
                   "sha256": hashlib.sha256((Path(init) / "model.safetensors").read_bytes()).hexdigest()}
    model = train_patch_classifier(start.cfg if start else cfg, images[:-n_cal], cov[:-n_cal], steps=steps, batch=32,
                                   lr=lr, seed=seed, init=start)
    cal = calibrate_threshold(model, images[-n_cal:], cov[-n_cal:], degrade_seed=None)
    command = f"python -m geomerase.benchmarks.watermark_detector build --n {n} --steps {steps} --seed {seed}"
    command += f" --recipe {recipe} --lr {lr:g}" + (f" --width {width}" if width != WIDTH else "")
    command += f" --init {init}" if init else ""
    record = {"n_images": n, "steps": steps, "seed": seed, "render_px": RENDER, "recipe": recipe,
              "recipe_mix": asdict(RECIPES[recipe]), "width": model.cfg.width, "lr": lr, "init": started,
              "calibration": cal,
              "render_seconds": round(t1 - t0, 1), "train_seconds": round(time.time() - t1, 1), "command": command}
    with atomic_dir(out) as tmp:
        save_classifier(model.half(), tmp, {"concept": "watermark", "build": record})  # fp16 weights
        write_manifest(tmp)
    return record


# ---------------------------------------------------------------------------------- evaluation
def photo_set(n: int, seed: int) -> list[tuple[Image.Image, list[list[float]]]]:
    """``n`` 512 px crops of the evaluation photos, every second one with an ICD-rule watermark."""
    from geomerase.benchmarks.text_detectors import background, photos
    from geomerase.data.concepts import add_watermark

    rng, srcs, out = np.random.default_rng(seed), photos(), []
    for i in range(n):
        img = background(srcs, rng)
        out.append(add_watermark(img, rng) if i % 2 == 0 else (img, []))
    return out


def readme_default_classifier(work: Path) -> Path:
    """*Before*: ``geomerase classifier train --concept watermark`` with its defaults on a 256 px ICD."""
    from geomerase.cli import main as cli
    from geomerase.data.icd import build_icd

    build_icd("watermark", 2000, 0.5, 256, 0, work / "icd", progress=False)
    if cli(["classifier", "train", "--input", str(work / "icd" / "*.tar"), "--concept", "watermark",
            "--out", str(work / "pc")]) != 0:
        raise RuntimeError("training the README-default watermark classifier failed")
    return work / "pc"


def evaluate(n: int, seed: int, candidate: Path | None = None) -> dict[str, Any]:
    """Before vs after (and ``candidate``, a detector folder, when given) on :func:`photo_set`."""
    from geomerase.benchmarks.text_detectors import score
    from geomerase.core.detectors import build_detector
    from geomerase.core.detectors_real import shipped_watermark_record

    torch.set_num_threads(1)
    images = photo_set(n, seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        before_dir = readme_default_classifier(Path(tmp))
        before_s = time.time() - t0
        before = build_detector("watermark", "watermark", classifier=str(before_dir))
    after = build_detector("watermark", "watermark")
    rows = [score("before: README-default classifier (ICD, 32 px)", before, images),
            score(f"after: shipped detector (wide family {shipped_watermark_record().get('recipe', 'v1')}, 128 px)",
                  after, images)]
    res = {"environment": environment(), "config": {"n": n, "seed": seed, "size": 512, "grid": GRID},
           "before_train_seconds": round(before_s, 1), "rows": rows, "after_threshold_sweep": threshold_sweep(after, images)}
    if candidate is not None:
        cand = build_detector("watermark", "watermark", classifier=str(candidate))
        rec = json.loads((candidate / "config.json").read_text())["build"]
        rows.append(score(f"candidate, not shipped (wide family {rec.get('recipe', 'v1')}, 128 px)", cand, images))
        res["candidate"] = {"build": rec, "threshold_sweep": threshold_sweep(cand, images)}
    return res


def threshold_sweep(det, images: list[tuple[Image.Image, list[list[float]]]],
                    thresholds: tuple[float, ...] = (0.35, 0.45, 0.55, 0.65, 0.75)) -> list[dict[str, float]]:
    """Cell precision/recall and the share of clean photos flagged at other decision thresholds (a diagnostic of
    whether any threshold separates the photos; the shipped threshold is calibrated on training-family data)."""
    from geomerase.data.loader import image_to_tensor
    from geomerase.core.geometry import GeometryConfig, cell_precision_recall

    enc = GeometryConfig(grid=GRID).build()
    x = torch.stack([image_to_tensor(im, RES) for im, _ in images]).float() / 127.5 - 1
    probs = det.classifier.cell_probs(x).flatten(1)
    true = [enc.cells_from_boxes(b, *im.size) for im, b in images]
    clean = [i for i, (_, b) in enumerate(images) if not b]
    out = []
    for thr in thresholds:
        pred = [torch.nonzero(p >= thr).flatten().tolist() for p in probs]
        pr = cell_precision_recall(pred, true)
        out.append({"threshold": thr, "cell_precision": round(pr["precision"], 3), "cell_recall": round(pr["recall"], 3),
                    "clean_flagged": round(sum(bool(pred[i]) for i in clean) / max(1, len(clean)), 3)})
    return out


def _init_note(rec: dict[str, Any]) -> str:
    """How the weights a build continued from were built (empty for a build from scratch)."""
    init = rec.get("init")
    if not init:
        return ""
    from geomerase.core.detectors_real import shipped_watermark_dir

    first = init["build"] or {}
    shipped = hashlib.sha256((shipped_watermark_dir() / "model.safetensors").read_bytes()).hexdigest() == init["sha256"]
    return (f", continuing from {'the shipped weights' if shipped else 'weights'} (sha256 {init['sha256'][:16]}...) "
            f"built by `{first.get('command', '?')}` ({first.get('train_seconds', '?')} s training)")


def write_md(res: dict[str, Any], path: Path) -> None:
    from geomerase.core.detectors_real import shipped_watermark_record

    env, rec = res["environment"], shipped_watermark_record()
    lines = ["# Watermark detector on real photographs: before vs after "
             "(`python -m geomerase.benchmarks.watermark_detector eval`)", "",
             f"{res['config']['n']} crops of scikit-image photos at 512 px (none used in training), every second one "
             "with an ICD-rule watermark (brand names in faces the shipped detector never saw); grid 4, one thread. "
             f"{env['cpu']}, {env['time_utc']}; python {env['python']}, torch {env['torch']}.", "",
             f"After: `geomerase/weights/detectors/watermark/`, built by `{rec['command']}` "
             f"({rec['render_seconds']} s rendering, {rec['train_seconds']} s training; calibrated threshold "
             f"{rec['calibration']['threshold']} on the held-back tenth of its training mix, cell precision "
             f"{rec['calibration']['precision']:.3f} / recall {rec['calibration']['recall']:.3f} there)" + _init_note(rec)
             + ". Before: `geomerase classifier train --concept watermark` with its "
             f"defaults on a 2000-image 256 px ICD ({res['before_train_seconds']} s).", "",
             "| detector | cell precision | cell recall | image precision | image recall | images per CPU s |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['detector']} | {r['cell_precision']:.3f} | {r['cell_recall']:.3f} | "
                     f"{r['image_precision']:.3f} | {r['image_recall']:.3f} | {r['images_per_cpu_s']} |")
    lines += ["", "After, at other decision thresholds (diagnostic; the shipped one is calibrated on the training family):",
              "", "| threshold | cell precision | cell recall | clean photos flagged |", "|---|---|---|---|"]
    lines += _sweep_lines(res["after_threshold_sweep"]) + _candidate_lines(res.get("candidate"))
    atomic_write(path, "\n".join(lines) + "\n")


def _sweep_lines(sweep: list[dict[str, float]]) -> list[str]:
    return [f"| {r['threshold']} | {r['cell_precision']} | {r['cell_recall']} | {r['clean_flagged']} |" for r in sweep]


def _candidate_lines(cand: dict[str, Any] | None) -> list[str]:
    """The md section on a detector that was scored but not shipped (none when there was none)."""
    if not cand:
        return []
    rec, cal = cand["build"], cand["build"]["calibration"]
    return ["", f"Candidate (not shipped): built by `{rec['command']}` ({rec['render_seconds']} s rendering, "
            f"{rec['train_seconds']} s training{_init_note(rec)}); threshold {cal['threshold']} calibrated on its "
            f"held-back tenth (cell precision {cal['precision']:.3f} / recall {cal['recall']:.3f} there). "
            "At other decision thresholds:", "",
            "| threshold | cell precision | cell recall | clean photos flagged |", "|---|---|---|---|",
            *_sweep_lines(cand["threshold_sweep"])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("build", "eval"), help="build the shipped weights, or evaluate them")
    ap.add_argument("--n", type=int, default=None, help="images (build: 4000 training images; eval: 160 photos)")
    ap.add_argument("--steps", type=int, default=1500, help="build: classifier training steps (default 1500)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0; eval uses seed + 1)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=SHIPPED_RECIPE,
                    help=f"build: training mix (data.watermarks.RECIPES; default {SHIPPED_RECIPE}, the shipped one)")
    ap.add_argument("--width", type=int, default=WIDTH, help=f"build: first conv layer's channels (default {WIDTH})")
    ap.add_argument("--lr", type=float, default=2e-3, help="build: peak learning rate (default 2e-3)")
    ap.add_argument("--init", default=None,
                    help="build: continue from the weights of this detector folder instead of training from scratch")
    ap.add_argument("--candidate", default=None, help="eval: also score this detector folder (not shipped)")
    ap.add_argument("--out", default=None, help="build: weights folder (default: the package's); eval: results dir")
    a = ap.parse_args(argv)
    if a.what == "build":
        from geomerase.core.detectors_real import shipped_watermark_dir

        out = Path(a.out) if a.out else shipped_watermark_dir()
        print(json.dumps(build(a.n or 4000, a.steps, a.seed, out, a.recipe, a.width,
                               Path(a.init) if a.init else None, a.lr), indent=1))
        return
    res = evaluate(a.n or 160, a.seed + 1, Path(a.candidate) if a.candidate else None)
    out = Path(a.out) if a.out else RESULTS_DIR
    atomic_write(out / "watermark_detector_cpu.json", json.dumps(res, indent=1) + "\n")
    write_md(res, out / "watermark_detector_cpu.md")
    print((out / "watermark_detector_cpu.md").read_text())


if __name__ == "__main__":
    main()
