"""The QR detector (``--detector qr``, OpenCV's multi-code detector) on real photographs at 512 px with
codes placed by rules the ICD renderer (:func:`geomerase.data.concepts.add_qr`) does not use.

    nice -n 10 python -m geomerase.benchmarks.qr_detector [--n 160] [--seed 1] [--option KEY=VALUE ...]

Photos: the evaluation photos of :mod:`geomerase.benchmarks.text_detectors` (scikit-image's samples and
matplotlib's ``grace_hopper.jpg``; none of :data:`geomerase.data.watermarks.TRAIN_PHOTOS`), random
crops, 4:3 and 3:4 in turn, longer side 512 px (:func:`geomerase.benchmarks.detector_throughput.
aspect_crop`). Half the images (of each shape) get one code: a payload of 4-300 characters (URLs,
Wi-Fi and contact records, digits, sentences) at error correction L/M/Q/H, a quiet zone of 1, 2 or 4
modules, side (quiet zone included) 6-30% of the longer image side, drawn anti-aliased at that size
(modules are not whole pixels), dark-on-light grey or tinted, rotated up to 15 degrees in half the
images, sheared or put in perspective in a third, anywhere in the image, one in four of them with up
to 15% of its side beyond an edge. The ground-truth box is the bounding box of the drawn code (quiet
zone included, as the ICD's boxes), clipped to the image. Every image is stored as JPEG at quality
70-95.

Scored at grid 4 with the project's default coverage threshold for a cell: cell precision/recall/F1
(micro-averaged), image precision/recall (flagged = any detection), three ways: the detector alone on
the decoded images (one thread), and annotating the JPEG shards locally and through the Ray annotator
(2 workers), whose cells are read back from the annotations. Per-core rate = images / CPU seconds.
``--option`` sets :class:`~geomerase.core.detectors_real.QRDetectorConfig` fields (default: its defaults).
Writes ``benchmarks/results/qr_detector_cpu.{json,md}``; seed 1 is the held-out set the defaults are
reported on (they were chosen on seed 2).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")  # OpenCV's thread pool, here and in Ray workers

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import string  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from geomerase.benchmarks.common import RESULTS_DIR, detection_scores, environment  # noqa: E402
from geomerase.core.metrics import wilson_interval  # noqa: E402
from geomerase.data.shards import atomic_write  # noqa: E402

SIZE, GRID = 512, 4
SIDE = (0.06, 0.30)
"""Code side (quiet zone included) as a share of the image's longer side."""
QUIET = (1, 2, 4)
JPEG_QUALITY = (70, 95)
TARGET_PRECISION = 0.95
BEFORE = {"settings": "engine=classic, fallback=none, upscale=1 (native size), require_decode=False",
          "cell_precision": 1.000, "cell_recall": 0.223, "image_precision": 1.000, "image_recall": 0.188,
          "images_per_cpu_s": 44.69}
"""The ``qr`` detector alone on seed 1 (160 photos) before the Aruco pass and the 1.5x upscale (commit 3e53dcf).
At that time the classic pass also repeated ``detectMulti`` after an empty ``detectAndDecodeMulti``."""
_WORDS = ("table", "reserved", "menu", "order", "scan", "pay", "ticket", "gate", "seat", "museum", "tour",
          "audio", "guide", "parcel", "track", "invoice", "coupon", "event", "room", "floor", "exhibit")


@dataclass
class Placement:
    """How one code is drawn: its content, size, colour, geometry and where it goes."""

    payload: str
    ecc: str
    """Error correction level: L, M, Q or H."""
    quiet: int
    """Quiet-zone width in modules."""
    side: float
    """Side of the code with its quiet zone, px (before rotation and tilt)."""
    dark: tuple[int, int, int]
    light: tuple[int, int, int]
    angle: float
    """Rotation, degrees."""
    warp: str
    """'none', 'shear' or 'perspective'."""
    corners: tuple[tuple[float, float], ...]
    """Where the code's corners land (top-left, top-right, bottom-right, bottom-left), px; may leave the image."""


def payload(rng: np.random.Generator) -> str:
    """A QR payload of 4-300 characters: a URL, a Wi-Fi or contact record, digits or a sentence."""
    low, alnum = string.ascii_lowercase, string.ascii_letters + string.digits
    word = lambda a, b: "".join(str(rng.choice(list(low))) for _ in range(int(rng.integers(a, b))))  # noqa: E731
    kind = int(rng.integers(6))
    if kind == 0:
        return "".join(str(rng.choice(list(string.digits))) for _ in range(int(rng.integers(4, 40))))
    if kind == 1:
        return f"WIFI:T:WPA;S:{word(4, 12)};P:{''.join(str(rng.choice(list(alnum))) for _ in range(12))};;"
    if kind == 2:
        return (f"BEGIN:VCARD\nVERSION:3.0\nFN:{word(3, 9).title()} {word(4, 11).title()}\nTEL:+{rng.integers(10**9, 10**11)}"
                f"\nEMAIL:{word(3, 9)}@{word(4, 9)}.org\nEND:VCARD")
    if kind == 3:
        return " ".join(str(rng.choice(_WORDS)) for _ in range(int(rng.integers(8, 45))))
    path = "/".join(word(2, 9) for _ in range(int(rng.integers(1, 5 if kind == 4 else 12))))
    query = "&".join(f"{word(1, 6)}={word(2, 16)}" for _ in range(int(rng.integers(0, 2 if kind == 4 else 8))))
    return f"https://{word(3, 12)}.{rng.choice(['org', 'de', 'fr', 'info', 'app'])}/{path}" + (f"?{query}" if query else "")


def modules(text: str, ecc: str) -> np.ndarray:
    """The code's module matrix (True = dark), without a quiet zone."""
    import qrcode

    levels = {"L": qrcode.constants.ERROR_CORRECT_L, "M": qrcode.constants.ERROR_CORRECT_M,
              "Q": qrcode.constants.ERROR_CORRECT_Q, "H": qrcode.constants.ERROR_CORRECT_H}
    qr = qrcode.QRCode(error_correction=levels[ecc], box_size=1, border=0)
    qr.add_data(text)
    qr.make(fit=True)
    return np.array(qr.get_matrix(), dtype=bool)


def draw_placement(rng: np.random.Generator, width: int, height: int) -> Placement:
    """A random placement on a ``width`` x ``height`` image (the rules in the module docstring)."""
    text, ecc, quiet = payload(rng), str(rng.choice(list("LMQH"))), int(rng.choice(QUIET))
    side = float(rng.uniform(*SIDE)) * max(width, height)
    if rng.random() < 0.75:
        dark, light = (int(rng.integers(0, 60)),) * 3, (int(rng.integers(205, 256)),) * 3
    else:  # tinted: a dark saturated colour on a pale tint
        hue = rng.random()
        dark = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.15, 0.45))
        light = _hsv((hue + rng.uniform(-0.2, 0.2)) % 1, rng.uniform(0.0, 0.15), rng.uniform(0.88, 1.0))
    angle = float(rng.uniform(-15, 15)) if rng.random() < 0.5 else 0.0
    warp = str(rng.choice(["none", "shear", "perspective"], p=[2 / 3, 1 / 6, 1 / 6]))
    sq = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * side
    if warp == "shear":
        sq = sq @ np.array([[1.0, rng.uniform(-0.15, 0.15)], [rng.uniform(-0.15, 0.15), 1.0]]).T
    elif warp == "perspective":
        sq = sq + rng.uniform(-0.08, 0.08, (4, 2)) * side
    t = np.deg2rad(angle)
    sq = sq @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T
    lo, hi = sq.min(0), sq.max(0)
    extent = hi - lo
    over = float(rng.uniform(0.0, 0.15)) if rng.random() < 0.25 else 0.0
    cx = rng.uniform(-lo[0] - over * extent[0], width - hi[0] + over * extent[0])
    cy = rng.uniform(-lo[1] - over * extent[1], height - hi[1] + over * extent[1])
    if over and rng.random() < 0.5:  # push it over the edge it is closest to, by ``over``
        cx = -lo[0] - over * extent[0] if cx < width / 2 else width - hi[0] + over * extent[0]
    elif over:
        cy = -lo[1] - over * extent[1] if cy < height / 2 else height - hi[1] + over * extent[1]
    corners = tuple((float(x + cx), float(y + cy)) for x, y in sq)
    return Placement(text, ecc, quiet, side, dark, light, angle, warp, corners)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def draw_qr(img: Image.Image, p: Placement) -> tuple[Image.Image, list[list[float]]]:
    """``img`` with the code of ``p`` drawn; the bounding box of its corners clipped to the image (none if
    the code lies outside)."""
    import cv2

    from geomerase.core.geometry import clip_box

    grid = np.pad(modules(p.payload, p.ecc), p.quiet, constant_values=False)
    n = grid.shape[0]
    scale = max(2, int(np.ceil(2 * p.side / n)))  # draw at >= 2x the final module size, then warp down
    big = np.kron(~grid, np.ones((scale, scale), bool)).astype(np.float32)  # 1 = light
    src = np.float32([[0, 0], [n * scale, 0], [n * scale, n * scale], [0, n * scale]])
    w, h = img.size
    m = cv2.getPerspectiveTransform(src, np.float32(p.corners))
    # Anti-aliased: blur the drawing to the module size it is shrunk to before sampling it.
    sigma = max(0.0, 0.5 * (n * scale / p.side - 1))
    if sigma > 0.3:
        big = cv2.GaussianBlur(big, (0, 0), sigma)
    ink = cv2.warpPerspective(big, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.warpPerspective(np.ones_like(big), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    dark, light = np.float32(p.dark), np.float32(p.light)
    code = dark + ink[..., None] / np.maximum(mask[..., None], 1e-6) * (light - dark)
    a = np.asarray(img.convert("RGB"), np.float32)
    out = a * (1 - mask[..., None]) + np.clip(code, 0, 255) * mask[..., None]
    c = np.asarray(p.corners)
    box = clip_box([*c.min(0), *c.max(0)], w, h)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)), [list(box)] if box else []


def build_set(n: int, seed: int, size: int = SIZE) -> tuple[list[tuple[Image.Image, list[list[float]]]], list[bytes],
                                                            list[dict[str, Any]]]:
    """``n`` photos (longer side ``size``, 4:3 and 3:4 in turn), half of each shape with a code: the decoded
    images with their boxes, their JPEG bytes, and what was done to each (placement, JPEG quality)."""
    from geomerase.benchmarks.detector_throughput import aspect_crop
    from geomerase.benchmarks.text_detectors import photos

    rng, srcs = np.random.default_rng(seed), photos()
    items, encoded, info = [], [], []
    for i in range(n):
        img, boxes, rec = aspect_crop(srcs, rng, size, landscape=i % 2 == 0), [], {}
        if i % 4 < 2:
            p = draw_placement(rng, *img.size)
            img, boxes = draw_qr(img, p)
            rec = {k: v for k, v in asdict(p).items() if k != "payload"} | {
                "payload_chars": len(p.payload), "module_px": p.side / (len(modules(p.payload, p.ecc)) + 2 * p.quiet)}
        q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        encoded.append(buf.getvalue())
        items.append((Image.open(io.BytesIO(encoded[-1])).convert("RGB"), boxes))
        info.append({**rec, "jpeg_quality": q})
    return items, encoded, info


# ---------------------------------------------------------------------------------- scoring
def annotated_scores(out: Path, geometry: Any) -> dict[str, Any]:
    """Cell and image precision/recall of annotated shards in ``out``: the cells their annotations carry
    against the cells of the ground-truth ``boxes`` in their json (``geometry``: a GeometryConfig)."""
    from geomerase.data.shards import iter_samples

    enc = geometry.build()
    pred, true, flagged, has = [], [], [], []
    for s in iter_samples(str(out / "*.tar")):
        ann, boxes = s.meta["annotation"], s.meta["boxes"]
        pred.append(ann["cells"])
        true.append(enc.cells_from_boxes(boxes, s.meta["width"], s.meta["height"]))
        flagged.append(bool(ann["detections"]))
        has.append(bool(boxes))
    return {"n_images": len(pred), **detection_scores(pred, true, flagged, has)}


def evaluate(items: list[tuple[Image.Image, list[list[float]]]], encoded: list[bytes], work: Path,
             engines: tuple[str, ...] = ("local", "ray"), shard_size: int = 16,
             options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for the ``qr`` detector (built with ``options``) on ``items``: alone on the decoded images (one
    thread), then annotating their JPEG shards (``encoded``) with each engine ('local': this process; 'ray':
    the Ray annotator, 2 workers; Ray is started here when needed and shut down after)."""
    import cv2
    import torch

    from geomerase.benchmarks.detector_throughput import measure, write_input
    from geomerase.benchmarks.text_detectors import score
    from geomerase.core.detectors import build_detector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.distributed.ray_annotate import AnnotatorSpec, RayAnnotateConfig, start_ray

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    geometry = GeometryConfig(grid=GRID)
    options = dict(options or {})
    r = score("qr", build_detector("qr", "qr", **options), items)
    rows = [{"engine": "detector only", "images": r.pop("n_images"), **{k: v for k, v in r.items() if k != "detector"}}]
    rows[0].update(wall_seconds=rows[0].pop("seconds"), images_per_wall_s=rows[0].pop("images_per_s"))
    glob = write_input(items, work / "in", shard_size, encoded=encoded)
    spec = AnnotatorSpec(detector="qr", concept="qr", options=options, geometry=geometry)
    started = False
    try:
        for engine in engines:
            extra: dict[str, Any] = {}
            if engine == "ray":
                started, secs = start_ray(RayAnnotateConfig(num_workers=2))
                extra["ray_startup_seconds"] = round(secs, 2)
            rates = measure(spec, glob, work / f"out_{engine}", engine, shard_size)
            quality = annotated_scores(work / f"out_{engine}", geometry)
            quality.pop("n_images")
            rows.append({"engine": "local" if engine == "local" else "ray x2", **quality, **rates, **extra})
    finally:
        if started:
            import ray

            ray.shutdown()
    if "local" in engines and "ray" in engines:
        rows[-1]["identical_to_local"] = all(p.read_bytes() == (work / "out_ray" / p.name).read_bytes()
                                             for p in (work / "out_local").glob("*.tar"))
    return rows


MODULE_BINS = (1.5, 2.5, 4.0)
"""Module-size bin edges (px) of :func:`recall_breakdown`."""


def recall_breakdown(items: list[tuple[Image.Image, list[list[float]]]], info: list[dict[str, Any]],
                     options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per module-size bin: codes, and how many of them the ``qr`` detector (built with ``options``) finds (a
    detection on the code's box),
    beside OpenCV's single-code ``QRCodeDetector.detect`` and ``QRCodeDetectorAruco.detectMulti`` on the same
    images, OpenCV's RNG seeded as the detector seeds it (a diagnostic of where the misses lie: the size of the
    modules or the detection mode)."""
    import cv2

    from geomerase.benchmarks.common import boxes_overlap
    from geomerase.core.detectors import build_detector
    from geomerase.core.detectors_real import OPENCV_RNG_SEED

    det, single, aruco = build_detector("qr", "qr", **(options or {})), cv2.QRCodeDetector(), cv2.QRCodeDetectorAruco()

    def hit(points: Any, box: list[float]) -> bool:
        quads = np.asarray(points if points is not None else [], np.float64).reshape(-1, 4, 2)
        return any(boxes_overlap([*q.min(0), *q.max(0)], box) for q in quads)

    edges = (0.0, *MODULE_BINS, float("inf"))
    rows = [{"module_px": f"{lo:g}-{hi:g}" if hi < float("inf") else f">={lo:g}", "codes": 0, "qr": 0,
             "opencv_single": 0, "opencv_aruco": 0} for lo, hi in zip(edges[:-1], edges[1:])]
    for (img, boxes), rec in zip(items, info):
        if not boxes:
            continue
        row = rows[int(np.searchsorted(MODULE_BINS, rec["module_px"], side="right"))]
        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        cv2.setRNGSeed(OPENCV_RNG_SEED)
        ok_s, pts_s = single.detect(bgr)
        cv2.setRNGSeed(OPENCV_RNG_SEED)
        ok_a, pts_a = aruco.detectMulti(bgr)
        row["codes"] += 1
        row["qr"] += any(boxes_overlap(d.box, boxes[0]) for d in det.detect(img))
        row["opencv_single"] += bool(ok_s) and hit(pts_s, boxes[0])
        row["opencv_aruco"] += bool(ok_a) and hit(pts_a, boxes[0])
    return rows


# ---------------------------------------------------------------------------------- report
def write_md(res: dict[str, Any], path: Path) -> None:
    """The tables and their context as Markdown."""
    env, cfg, v = res["environment"], res["config"], res["versions"]
    L = ["# QR detector on real photographs (512 px, codes placed by non-ICD rules)", "",
         f"Environment: {env.get('cpu')} x{env.get('cpu_count')} (shared with other jobs: load average column), "
         f"{env.get('time_utc')}; Python {env.get('python')}, OpenCV {v['opencv']}, qrcode {v['qrcode']}, "
         f"Ray {v['ray']}, scikit-image {v['skimage']}. One thread per process.",
         f"Command: `{res['command']}`", "",
         "Detector settings: " + ", ".join(f"{k}={v}" for k, v in res["detector_config"].items()) + ".", "",
         f"Set: {cfg['n_images']} photos ({cfg['n_with_qr']} with a code), longer side {cfg['size']} px (4:3 and 3:4), "
         f"seed {cfg['seed']}; code side {cfg['side'][0]:g}-{cfg['side'][1]:g} of the longer side, quiet zone "
         f"{cfg['quiet']} modules, rotations, shear and perspective, grey or tinted, partly beyond an edge; JPEG quality "
         f"{cfg['jpeg_quality'][0]}-{cfg['jpeg_quality'][1]} (rules: `benchmarks/qr_detector.py`). Grid {cfg['grid']}; "
         f"a cell counts at {cfg['overlap_threshold']:g} coverage (project default); image flagged = any detection.", "",
         "| engine | images | cell precision | cell recall | cell F1 | image precision | image recall | "
         "images per CPU s | images/s (wall) | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append(f"| {r['engine']} | {r['images']} | {r['cell_precision']:.3f} | {r['cell_recall']:.3f} | "
                 f"{r['cell_f1']:.3f} | {r['image_precision']:.3f} | {r['image_recall']:.3f} | {r['images_per_cpu_s']} | "
                 f"{r['images_per_wall_s']} | {r['load_avg_1min']} |")
    r0 = res["rows"][0]
    p, low = r0["cell_precision"], wilson_interval(r0["tp"], r0["tp"] + r0["fp"])[0]
    verdict = "met" if p >= res["target_precision"] else f"missed by {res['target_precision'] - p:.3f}"
    ray = [r for r in res["rows"] if r["engine"] == "ray x2"]
    L += ["", f"Target cell precision >= {res['target_precision']}: {verdict} ({r0['fp']} false cells, {r0['tp']} true; "
          f"95% Wilson lower bound {low:.2f} from that many cells). Detector only: `detect` on the decoded images; local / ray x2: annotating the "
          "JPEG shards (decoding, detection, captions, writing), cells read back from the annotations"
          + (f"; Ray output byte-identical to local: {ray[0].get('identical_to_local')}, Ray start-up "
             f"{ray[0].get('ray_startup_seconds')} s (not in the rates)" if ray else "") + ". The ground-truth box "
          "holds the quiet zone (as the ICD's); the detector's box spans the finder patterns, inside it, so a found "
          "code can still miss quiet-zone cells.", "",
          "Where recall goes, per module size (px at 512 px): codes found by `qr`, and by OpenCV's single-code "
          "`QRCodeDetector.detect` and `QRCodeDetectorAruco.detectMulti` on the same images (diagnostic):", "",
          "| module px | codes | `qr` | OpenCV single-code | OpenCV Aruco multi |", "|---|---|---|---|---|"]
    L += [f"| {r['module_px']} | {r['codes']} | {r['qr']} | {r['opencv_single']} | {r['opencv_aruco']} |"
          for r in res["recall_breakdown"]]
    if (cfg["seed"], cfg["n_images"]) == (1, 160):
        L += _before_after(res["rows"][0], res["detector_config"])
    atomic_write(path, "\n".join(L) + "\n")


def _before_after(now: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Markdown lines: :data:`BEFORE` beside ``now`` (the detector-only row of seed 1, 160 photos)."""
    keys = ("cell_precision", "cell_recall", "image_precision", "image_recall")
    settings = ", ".join(f"{k}={config[k]}" for k in ("engine", "fallback", "upscale", "enlarge_filter",
                                                      "require_decode"))
    return ["", "Before / after (detector only, this set):", "",
            "| detector | settings | cell precision | cell recall | image precision | image recall | images per CPU s |",
            "|---|---|---|---|---|---|---|",
            "| before (3e53dcf) | " + BEFORE["settings"] + " | " + " | ".join(f"{BEFORE[k]:.3f}" for k in keys)
            + f" | {BEFORE['images_per_cpu_s']} |",
            f"| after | {settings} | " + " | ".join(f"{now[k]:.3f}" for k in keys) + f" | {now['images_per_cpu_s']} |"]


def main(argv: list[str] | None = None) -> None:
    """Build the set, score the detector alone, local and through Ray, write the result files."""
    import importlib.metadata as md
    import shutil

    import cv2
    import ray
    import skimage

    from geomerase.core.detectors import build_detector
    from geomerase.core.geometry import GeometryConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=160, help="images (half with a code)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--work", default="/tmp/qr_detector", help="where the shards are written (emptied first)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="QRDetectorConfig field, repeatable (engine=classic, fallback=none, upscale=1)")
    a = ap.parse_args(argv)
    options = dict(o.split("=", 1) for o in a.option)
    t0 = time.perf_counter()
    items, encoded, info = build_set(a.n, a.seed)
    build_s = time.perf_counter() - t0
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = evaluate(items, encoded, work, ("local", "ray"), a.shard_size, options)
    res = {"environment": environment(),
           "versions": {"opencv": cv2.__version__, "qrcode": md.version("qrcode"), "ray": ray.__version__,
                        "skimage": skimage.__version__},
           "command": " ".join(["nice -n 10 python -m geomerase.benchmarks.qr_detector",
                                *(argv if argv is not None else sys.argv[1:])]),
           "config": {"n_images": len(items), "n_with_qr": sum(bool(b) for _, b in items), "seed": a.seed,
                      "size": SIZE, "grid": GRID, "overlap_threshold": GeometryConfig().overlap_threshold,
                      "side": list(SIDE), "quiet": list(QUIET), "jpeg_quality": list(JPEG_QUALITY),
                      "shard_size": a.shard_size, "build_seconds": round(build_s, 2)},
           "detector_config": asdict(build_detector("qr", "qr", **options).cfg),
           "target_precision": TARGET_PRECISION, "rows": rows, "recall_breakdown": recall_breakdown(items, info, options),
           "codes": [{"boxes": b, **rec} for (_, b), rec in zip(items, info) if b]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "qr_detector_cpu.json", json.dumps(res, indent=1) + "\n")
    write_md(res, out / "qr_detector_cpu.md")
    print((out / "qr_detector_cpu.md").read_text())


if __name__ == "__main__":
    main()
