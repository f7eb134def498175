"""Detector throughput at real image sizes: images per CPU second (per core) and per wall second, for
every built-in detector at 512 and 1024 px, annotating local (one process, one thread) and through the
Ray annotator (2 workers).

    nice -n 10 python -m geomerase.benchmarks.detector_throughput [--n 32] [--work /tmp/detector_throughput]

Images: random crops of scikit-image's sample photographs (plus matplotlib's ``grace_hopper.jpg``, the
set of :mod:`geomerase.benchmarks.text_detectors`), landscape 4:3 and portrait 3:4 in turn, resized so
the longer side is 512 or 1024 px, stored as JPEG (quality 90) in webdataset shards. Half the images (of
each shape) get the detector's concept from the ICD renderers (:func:`geomerase.data.concepts.overlay`: QR codes
from the ``qrcode`` package, text and watermarks drawn with PIL) at the image's own size.

``watermark`` is the patch-classifier path: a classifier (resolution 64, grid 4) trained here for
``--wm-steps`` steps on 256 px crops of the same photos with ICD watermarks (seed apart from the
benchmark's), neither trained to convergence nor calibrated: its rows measure the speed of the
patch-classifier path, which does not depend on the weights, not its quality.

Per-core rate = images / CPU seconds spent annotating (``cpu_seconds`` of each shard in the manifest:
decoding, detection, caption rewriting and writing, in the annotating process and its children, i.e.
Tesseract); Ray's own processes are not counted there. Wall rates exclude detector loading and Ray
start-up (reported apart). Writes ``benchmarks/results/detector_throughput_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")  # OpenCV's thread pool, here and in Ray workers

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from geomerase.benchmarks.common import RESULTS_DIR, boxes_overlap, environment  # noqa: E402
from geomerase.data.shards import atomic_write  # noqa: E402
from geomerase.benchmarks.text_detectors import _versions, photos  # noqa: E402

SIZES = (512, 1024)
GRID = 4
DETECTORS: dict[str, str] = {"qr": "qr", "text": "text", "text-tesseract": "text", "watermark": "watermark"}
"""Detector name -> the concept overlaid on its images."""


def aspect_crop(srcs: list[np.ndarray], rng: np.random.Generator, size: int, landscape: bool) -> Image.Image:
    """A random crop of a random photo of ``srcs`` (60-100% of the largest 4:3 or 3:4 window), resized so
    its longer side is ``size`` (4:3 when ``landscape``, else 3:4)."""
    a = srcs[int(rng.integers(len(srcs)))]
    h, w = a.shape[:2]
    cw, ch = (4, 3) if landscape else (3, 4)
    k = min(w / cw, h / ch) * rng.uniform(0.6, 1.0)
    x, y = int(rng.integers(0, w - int(cw * k) + 1)), int(rng.integers(0, h - int(ch * k) + 1))
    crop = Image.fromarray(a[y:y + int(ch * k), x:x + int(cw * k)])
    return crop.resize((size, size * ch // cw) if cw > ch else (size * cw // ch, size), Image.BICUBIC)


def photo_set(srcs: list[np.ndarray], concept: str, size: int, n: int, seed: int
              ) -> list[tuple[Image.Image, list[list[int]]]]:
    """``n`` photos whose longer side is ``size`` (4:3 and 3:4 in turn), half of each shape with ``concept``."""
    from geomerase.data.concepts import overlay

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = aspect_crop(srcs, rng, size, landscape=i % 2 == 0)
        out.append(overlay(concept, img, rng) if i % 4 < 2 else (img, []))
    return out


def write_input(items: list[tuple[Image.Image, list[list[int]]]], folder: Path, shard_size: int,
                encoded: list[bytes] | None = None) -> str:
    """Shards of ``items`` (JPEG, a caption, ground-truth ``boxes`` in the json); returns their glob.

    ``encoded``: the JPEG bytes of each item's image, stored as they are; without it each image is
    encoded at quality 90."""
    from geomerase.data.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(items), shard_size):
        recs = []
        for i, (img, boxes) in enumerate(items[s:s + shard_size], start=s):
            if encoded is not None:
                jpg = encoded[i]
            else:
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                jpg = buf.getvalue()
            recs.append({"__key__": f"{i:06d}", "jpg": jpg, "txt": "a photograph",
                         "json": {"boxes": boxes, "width": img.width, "height": img.height}})
        write_shard(folder / f"{s // shard_size:05d}.tar", recs)
    return str(folder / "*.tar")


def train_watermark(srcs: list[np.ndarray], folder: Path, steps: int, seed: int) -> Path:
    """A patch classifier (resolution 64, grid 4) trained briefly on 256 px crops with ICD watermarks."""
    import torch

    from geomerase.core.classifiers import (PatchClassifierConfig, coverage_targets, save_classifier,
                                            train_patch_classifier)
    from geomerase.data.loader import image_to_tensor

    cfg = PatchClassifierConfig(resolution=64, grid=GRID)
    items = photo_set(srcs, "watermark", 256, 256, seed)
    images = torch.stack([image_to_tensor(im, cfg.resolution) for im, _ in items])
    cover = coverage_targets([{"boxes": b} for _, b in items], [im.size for im, _ in items], GRID,
                             cfg.overlap_threshold)
    model = train_patch_classifier(cfg, images, cover, steps=steps, batch=32, seed=seed, progress=False)
    return save_classifier(model, folder, {"concept": "watermark"})


def hit_rates(out: Path) -> dict[str, Any]:
    """From annotated shards: share of concept images with a detection on a ground-truth box, and share
    of clean images with any detection."""
    from geomerase.data.shards import iter_samples

    hit, pos, flagged, neg = 0, 0, 0, 0
    for s in iter_samples(str(out / "*.tar")):
        boxes, found = s.meta["boxes"], [d["box"] for d in s.meta["annotation"]["detections"]]
        if boxes:
            pos += 1
            hit += any(boxes_overlap(f, b) for f in found for b in boxes)
        else:
            neg += 1
            flagged += bool(found)
    return {"hit_rate": round(hit / max(1, pos), 3), "clean_flagged": round(flagged / max(1, neg), 3)}


def _rates(manifest: dict[str, Any]) -> dict[str, Any]:
    images = sum(c["read"] for c in manifest["shards"].values())
    cpu = sum(c["cpu_seconds"] for c in manifest["shards"].values())
    wall = manifest["last_run"]["seconds"]
    return {"images": images, "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2),
            "images_per_cpu_s": round(images / cpu, 2), "images_per_wall_s": round(images / wall, 2),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def measure(spec: Any, glob: str, out: Path, engine: str, batch_size: int) -> dict[str, Any]:
    """Annotate ``glob`` into ``out`` (fresh) with ``engine`` ('local' or 'ray'); rates of that run."""
    import shutil

    from geomerase.core.annotate import annotate_shards
    from geomerase.distributed.ray_annotate import RayAnnotateConfig, annotate_shards_ray

    shutil.rmtree(out, ignore_errors=True)
    if engine == "local":
        t0 = time.perf_counter()
        annotator = spec.build()
        load = time.perf_counter() - t0
        m = annotate_shards(annotator, glob, out, batch_size=batch_size, progress=False)
        return {**_rates(m), "detector_load_seconds": round(load, 2)}
    m = annotate_shards_ray(spec, glob, out, RayAnnotateConfig(num_workers=2, batch_size=batch_size, progress=False))
    return {**_rates(m), "actor_warmup_seconds": m["last_run"]["actor_warmup_seconds"]}


def run(work: Path, n: int, shard_size: int, wm_steps: int, seed: int) -> dict[str, Any]:
    """Every detector at every size, local then Ray; returns the rows and Ray's start-up time."""
    import cv2
    import torch

    from geomerase.core.geometry import GeometryConfig
    from geomerase.distributed.ray_annotate import AnnotatorSpec, RayAnnotateConfig, start_ray

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    srcs = photos()
    t0 = time.perf_counter()
    wm = train_watermark(srcs, work / "watermark_classifier", wm_steps, seed + 1000)
    train_s = time.perf_counter() - t0
    globs = {(c, size): write_input(photo_set(srcs, c, size, n, seed + size), work / f"in_{c}_{size}", shard_size)
             for c in sorted(set(DETECTORS.values())) for size in SIZES}
    import ray

    _, startup = start_ray(RayAnnotateConfig(num_workers=2))
    rows = []
    try:
        for name, concept in DETECTORS.items():
            options = {"classifier": str(wm)} if name == "watermark" else {}
            spec = AnnotatorSpec(detector=name, concept=concept, options=options, geometry=GeometryConfig(grid=GRID))
            for size in SIZES:
                glob = globs[(concept, size)]
                for engine in ("local", "ray"):
                    out = work / f"out_{name}_{size}_{engine}"
                    row = {"detector": name, "size": size, "engine": engine if engine == "local" else "ray x2",
                           **measure(spec, glob, out, engine, shard_size), **hit_rates(out)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                local, ray_out = (work / f"out_{name}_{size}_{e}" for e in ("local", "ray"))
                rows[-1]["identical_to_local"] = all(
                    p.read_bytes() == (ray_out / p.name).read_bytes() for p in local.glob("*.tar"))
    finally:
        ray.shutdown()
    return {"rows": rows, "ray_startup_seconds": round(startup, 2), "watermark_train_seconds": round(train_s, 2)}


def write_md(res: dict[str, Any], path: Path) -> None:
    """The throughput table and its context as Markdown."""
    env, cfg, v = res["environment"], res["config"], res["versions"]
    L = ["# Detector throughput at 512 and 1024 px (CPU)", "",
         f"Machine: {env.get('cpu')}, {env.get('cpu_count')} cores shared with other jobs (load average "
         f"column), {env.get('time_utc')}. Python {env.get('python')}, torch {env.get('torch')}, "
         f"OpenCV {v.get('opencv')}, onnxruntime {v.get('onnxruntime')}, tesseract {v.get('tesseract')}, "
         f"{v.get('model_package')}, Ray {v.get('ray')}, scikit-image {v.get('skimage')}.",
         f"Command: `{res['command']}`", "",
         f"Set per detector and size: {cfg['n_images']} scikit-image photos (longer side = size, 4:3 and 3:4 "
         f"in turn, JPEG q90, {cfg['shard_size']} per shard), half with the concept overlaid by the ICD "
         f"renderers; grid {cfg['grid']}. Detector working sizes: {cfg['working_sizes']}. `watermark`: a "
         f"patch classifier (resolution 64) trained here for {cfg['wm_steps']} steps "
         f"({res['watermark_train_seconds']} s).", "",
         "| detector | px | engine | images | images per CPU s (per core) | images/s (wall) | CPU s | "
         "hit rate | clean flagged | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append(f"| {r['detector']} | {r['size']} | {r['engine']} | {r['images']} | {r['images_per_cpu_s']} | "
                 f"{r['images_per_wall_s']} | {r['cpu_seconds']} | {r['hit_rate']} | {r['clean_flagged']} | "
                 f"{r['load_avg_1min']} |")
    same = all(r.get("identical_to_local", True) for r in res["rows"])
    L += ["", "Per-core rate = images / CPU seconds of the annotating process and its children (Tesseract) "
          "summed over shards: decoding, detection, captions and writing. Ray: the two workers' CPU "
          "seconds; Ray's own processes are not counted. Wall rates exclude detector loading and Ray "
          f"start-up ({res['ray_startup_seconds']} s once, plus actor warm-up per run); on 2 shared cores "
          "two workers cannot double the wall rate.",
          "Hit rate: share of images with the concept where a detection overlaps a ground-truth box; clean "
          f"flagged: share of the others with any detection. Ray outputs byte-identical to local: {same}.",
          "`watermark`'s classifier is briefly trained and not calibrated (it flags clean images too): its rows "
          "measure the patch-classifier path's speed, which does not depend on the weights.", ""]
    atomic_write(path, "\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Build the sets, measure, write the result files."""
    import cv2
    import ray
    import skimage

    from geomerase.core.detectors import build_detector
    from geomerase.core.detectors_real import PPOCR_WHEEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per detector and size")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--wm-steps", type=int, default=60, help="training steps of the watermark classifier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/detector_throughput")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = run(work, a.n, a.shard_size, a.wm_steps, a.seed)
    working = {}
    for name in ("qr", "text", "text-tesseract"):
        det = build_detector(name, DETECTORS[name])
        working[name] = {s: "x".join(map(str, det.working_size(s, s * 3 // 4))) for s in SIZES}
    working["watermark"] = "64x64"
    res.update(environment=environment(),
               versions={**_versions(PPOCR_WHEEL.split("==")[0]), "opencv": cv2.__version__, "ray": ray.__version__,
                         "skimage": skimage.__version__},
               command=" ".join(["nice -n 10 python -m geomerase.benchmarks.detector_throughput",
                                 *(argv if argv is not None else sys.argv[1:])]),
               config={"n_images": a.n, "shard_size": a.shard_size, "grid": GRID, "wm_steps": a.wm_steps,
                       "seed": a.seed, "sizes": list(SIZES), "working_sizes": working,
                       "threads": "1 per process (OMP_NUM_THREADS, OPENCV_FOR_THREADS_NUM, torch, onnxruntime, "
                                  "tesseract)"})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "detector_throughput_cpu.json", json.dumps(res, indent=1))
    write_md(res, out / "detector_throughput_cpu.md")


if __name__ == "__main__":
    main()
