"""Annotation benchmark on this CPU: detector quality on held-out ICD images, local vs Ray
throughput, Ray's fixed start-up cost, and an interrupted (SIGINT) + resumed Ray run.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m geomerase.benchmarks.bench_annotate \
        [--work /tmp/bench_annotate] [--n-quality 200] [--n-text 100] [--n-throughput 2000] [--parts all]

Writes ``benchmarks/results/annotate_cpu.json`` and ``.md``. Quality: cell-level precision and
recall of the location tokens (grid 4, a cell counts at 25% coverage) against the ICD's ground
truth, on held-out seeds at 256 px with the ``wide`` size profile (sizes down to below what the
detectors can see), plus detection rate per object size and the smallest size still found.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from geomerase.benchmarks.common import RESULTS_DIR, boxes_overlap, environment
from geomerase.data.shards import atomic_write

GRID, THRESH = 4, 0.25


def _load_shards(glob: str):
    from geomerase.data.shards import iter_samples

    return list(iter_samples(glob))


def _quality(name: str, detector, samples, size_of, bins: list[float]) -> dict[str, Any]:
    """Cell P/R over all samples; per GT object: found if a detection overlaps its box."""
    from geomerase.core.geometry import GeometryConfig, cell_precision_recall

    enc = GeometryConfig(grid=GRID, overlap_threshold=THRESH).build()
    pred, true, objs = [], [], []
    t0 = time.perf_counter()
    for s in samples:
        found = detector.detect(s.image, s.meta)
        w, h = s.image.size
        pred.append(enc.cells_from_boxes([d.box for d in found], w, h))
        true.append(enc.cells_from_boxes(s.meta["boxes"], w, h))
        for b in s.meta["boxes"]:
            objs.append((size_of(b), any(boxes_overlap(d.box, b) for d in found)))
    secs = time.perf_counter() - t0
    pr = cell_precision_recall(pred, true)
    per_bin = []
    edges = [0.0, *bins, float("inf")]
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [f for sz, f in objs if lo <= sz < hi]
        per_bin.append({"range_px": [lo, None if hi == float("inf") else hi], "n": len(inside),
                        "found": int(sum(inside)), "rate": round(sum(inside) / len(inside), 3) if inside else None})
    found_sizes = sorted(sz for sz, f in objs if f)
    # Smallest size from which on at least 90% of the objects are found.
    reliable = None
    for sz in sorted({sz for sz, _ in objs}):
        rest = [f for s2, f in objs if s2 >= sz]
        if rest and sum(rest) / len(rest) >= 0.9:
            reliable = sz
            break
    return {"detector": name, "n_images": len(samples), "n_objects": len(objs),
            "cell_precision": round(pr["precision"], 4), "cell_recall": round(pr["recall"], 4),
            "cell_f1": round(pr["f1"], 4), "image_accuracy": round(pr["image_accuracy"], 4),
            "tp": pr["tp"], "fp": pr["fp"], "fn": pr["fn"],
            "objects_found": int(sum(f for _, f in objs)),
            "smallest_found_px": found_sizes[0] if found_sizes else None,
            "smallest_missed_px": min((sz for sz, f in objs if not f), default=None),
            "size_from_which_90pct_found_px": reliable,
            "per_size": per_bin, "seconds": round(secs, 1),
            "images_per_s": round(len(samples) / secs, 2)}


def run_quality(work: Path, n: int, n_text: int) -> dict[str, Any]:
    """Each registered detector at its defaults, plus the options beside the defaults (QR with decoding
    required, Tesseract for text), on held-out ICD seeds at 256 px."""
    from geomerase.core.detectors import build_detector
    from geomerase.data.icd import build_icd

    out: dict[str, Any] = {}
    held_seed = 1001
    build_icd("qr", n, 0.5, 256, held_seed, work / "q_qr", shard_size=1000, progress=False, sizes="wide")
    qr = _load_shards(str(work / "q_qr" / "*.tar"))
    side = lambda b: b[2] - b[0]  # noqa: E731  (code side incl. its quiet zone)
    out["qr"] = _quality("qr", build_detector("qr", "qr"), qr, side, [24, 33, 45, 64, 90])
    out["qr_require_decode"] = _quality("qr require_decode", build_detector("qr", "qr", require_decode=True), qr,
                                        side, [24, 33, 45, 64, 90])
    build_icd("text", n_text, 0.5, 256, held_seed, work / "q_text", shard_size=1000, progress=False, sizes="wide")
    tx = _load_shards(str(work / "q_text" / "*.tar"))
    height = lambda b: b[3] - b[1]  # noqa: E731  (line box height incl. outline)
    out["text"] = _quality("text (PP-OCR)", build_detector("text", "text"), tx, height, [6, 9, 12, 16, 24])
    out["text_tesseract"] = _quality("text-tesseract", build_detector("text-tesseract", "text"), tx, height,
                                     [6, 9, 12, 16, 24])
    build_icd("watermark", n, 0.5, 256, held_seed, work / "q_wm", shard_size=1000, progress=False)
    wm = _load_shards(str(work / "q_wm" / "*.tar"))
    diag = lambda b: max(b[2] - b[0], b[3] - b[1])  # noqa: E731
    out["watermark"] = _quality("watermark (shipped classifier)", build_detector("watermark", "watermark"), wm, diag,
                                [32, 64, 128])
    return out


def run_throughput(work: Path, n: int, shard_size: int) -> dict[str, Any]:
    import ray

    from geomerase.core.annotate import annotate_shards
    from geomerase.core.geometry import GeometryConfig
    from geomerase.data.icd import build_icd
    from geomerase.distributed.ray_annotate import AnnotatorSpec, RayAnnotateConfig, annotate_shards_ray

    inp = work / "tp_in"
    if not (inp / "icd-qr-meta.json").is_file():
        build_icd("qr", n, 0.5, 256, 7, inp, shard_size=shard_size, progress=False)
    spec = AnnotatorSpec(detector="qr", concept="qr", geometry=GeometryConfig(grid=GRID, overlap_threshold=THRESH))
    res: dict[str, Any] = {"images": n, "shards": (n + shard_size - 1) // shard_size, "detector": "qr",
                           "image_size": 256}
    t0 = time.perf_counter()
    ann = spec.build()
    build_s = time.perf_counter() - t0
    m = annotate_shards(ann, str(inp / "*.tar"), work / "tp_local", progress=False)
    lr = m["last_run"]
    res["local"] = {"seconds": lr["seconds"], "images_per_s": round(lr["images"] / lr["seconds"], 2),
                    "detector_load_seconds": round(build_s, 2), "load_avg_1min": os.getloadavg()[0]}
    for workers in (1, 2):
        m = annotate_shards_ray(spec, str(inp / "*.tar"), work / f"tp_ray{workers}",
                                RayAnnotateConfig(num_workers=workers, num_cpus=2, progress=False))
        lr = m["last_run"]
        res[f"ray_{workers}"] = {k: lr[k] for k in ("seconds", "images_per_s", "startup_seconds",
                                                     "actor_warmup_seconds", "driver_check_seconds", "workers")}
        res[f"ray_{workers}"]["load_avg_1min"] = os.getloadavg()[0]
        assert not ray.is_initialized()
        assert m["totals"]["read"] == n, m["totals"]
    for w in (1, 2):
        a = {p.name: p.read_bytes() for p in (work / "tp_local").glob("*.tar")}
        b = {p.name: p.read_bytes() for p in (work / f"tp_ray{w}").glob("*.tar")}
        res[f"ray_{w}_identical_to_local"] = a == b
    res["ratio_ray2_over_local"] = round(res["ray_2"]["images_per_s"] / res["local"]["images_per_s"], 3)
    res["ratio_ray2_over_ray1"] = round(res["ray_2"]["images_per_s"] / res["ray_1"]["images_per_s"], 3)
    return res


def run_sigint(work: Path, n: int, shard_size: int = 100) -> dict[str, Any]:
    """CLI Ray run interrupted with SIGINT after half the shards, then resumed."""
    from geomerase.data.icd import build_icd

    inp = work / "sig_in"
    if not (inp / "icd-qr-meta.json").is_file():
        build_icd("qr", n, 0.5, 256, 8, inp, shard_size=shard_size, progress=False)
    out = work / "sigint_out"
    cli = str(Path(sys.executable).parent / "geomerase")
    cmd = [cli, "annotate", "--engine", "ray", "--num-workers", "2", "--input", str(inp / "*.tar"),
           "--detector", "qr", "--out", str(out)]
    n_shards = len(list(inp.glob("*.tar")))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committed = 0
    while proc.poll() is None:
        mf = out / "_manifest.json"
        if mf.is_file():
            try:
                committed = len(json.loads(mf.read_text())["shards"])
            except (json.JSONDecodeError, KeyError):
                pass
        if committed >= n_shards // 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    first_out, _ = proc.communicate(timeout=300)
    interrupted_at = committed
    m1 = json.loads((out / "_manifest.json").read_text())
    res2 = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    m2 = json.loads((out / "_manifest.json").read_text())
    from geomerase.data.shards import iter_samples

    keys = [s.key for s in iter_samples(str(out / "*.tar"))]
    skipped = [r["key"] for c in m2["shards"].values() for r in c["skipped_samples"]]
    return {"input_images": n, "shards": n_shards, "sigint_after_committed_shards": interrupted_at,
            "first_run_exit_code": proc.returncode, "committed_after_first_run": len(m1["shards"]),
            "second_run_exit_code": res2.returncode, "second_run_shards_done": m2["last_run"]["shards_done"],
            "final_totals": m2["totals"], "output_keys": len(keys), "unique_output_keys": len(set(keys)),
            "skipped_keys": len(skipped), "counts_equal_input": m2["totals"]["read"] == n == len(set(keys)) + len(skipped),
            "wall_seconds": round(time.time() - t0, 1),
            "first_run_tail": first_out.strip().splitlines()[-3:] if first_out else []}


def write_md(res: dict[str, Any], path: Path) -> None:
    L = ["# Annotation on CPU: detector quality, local vs Ray throughput, interrupted run", "",
         f"Environment: {res['environment'].get('cpu')} x{res['environment'].get('cpu_count')}, "
         f"{res['environment'].get('time_utc')}; 1-min load average per throughput run in its table "
         "(about 1 per busy process means nothing else ran).",
         f"Command: `{res['command']}`", ""]
    q = res.get("quality")
    if q:
        L += ["## Detector quality (held-out ICD, 256 px, `wide` sizes; grid 4, cell = 25% coverage)", "",
              "| detector | images | cell precision | cell recall | F1 | image acc. | objects found | smallest found (px) | "
              "smallest missed (px) | >=90% found from (px) | images/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in q.items():
            L.append(f"| {v['detector']} | {v['n_images']} | {v['cell_precision']:.3f} | {v['cell_recall']:.3f} | "
                     f"{v['cell_f1']:.3f} | {v['image_accuracy']:.3f} | {v['objects_found']}/{v['n_objects']} | "
                     f"{v['smallest_found_px']} | {v['smallest_missed_px']} | {v['size_from_which_90pct_found_px']} | "
                     f"{v['images_per_s']} |")
        L += ["", "Size = QR code side incl. quiet zone; text line box height; watermark box's longer side.", ""]
        for k, v in q.items():
            L.append(f"- {v['detector']}: found per size " + ", ".join(
                f"[{b['range_px'][0]:g}, {b['range_px'][1] if b['range_px'][1] is not None else 'inf'}) "
                f"{b['found']}/{b['n']}" for b in v["per_size"]))
        L.append("")
    t = res.get("throughput")
    if t:
        L += [f"## Throughput ({t['images']} images, 256 px, {t['shards']} shards, detector `qr`)", "",
              "| engine | images/s | processing s | Ray start-up s | actors loading detector s | load avg |",
              "|---|---|---|---|---|---|"]
        lo = t["local"]
        L.append(f"| local (1 process) | {lo['images_per_s']} | {lo['seconds']:.1f} | – | "
                 f"{lo['detector_load_seconds']} (driver) | {lo['load_avg_1min']:.2f} |")
        for w in (1, 2):
            r = t[f"ray_{w}"]
            L.append(f"| Ray, {w} worker(s) | {r['images_per_s']} | {r['seconds']:.1f} | {r['startup_seconds']:.1f} | "
                     f"{r['actor_warmup_seconds']:.1f} | {r['load_avg_1min']:.2f} |")
        L += ["", f"Ray-2 / local = **{t['ratio_ray2_over_local']}x** (Ray-2 / Ray-1 = {t['ratio_ray2_over_ray1']}x); "
              f"outputs byte-identical to local: Ray-1 {t['ray_1_identical_to_local']}, Ray-2 {t['ray_2_identical_to_local']}. "
              "Fixed Ray cost = start-up + actors loading the detector (+ the driver's own check build).", ""]
    s = res.get("sigint")
    if s:
        L += ["## Interrupted and resumed (CLI, Ray, 2 workers)", "",
              f"SIGINT after {s['sigint_after_committed_shards']}/{s['shards']} shards committed (exit code "
              f"{s['first_run_exit_code']}, {s['committed_after_first_run']} committed); the rerun did "
              f"{s['second_run_shards_done']} shards (exit {s['second_run_exit_code']}). Final manifest: read "
              f"{s['final_totals']['read']}, annotated {s['final_totals']['annotated']}, skipped "
              f"{s['final_totals']['skipped']}; output keys {s['output_keys']} ({s['unique_output_keys']} unique) for "
              f"{s['input_images']} input images: counts equal input = **{s['counts_equal_input']}**.", ""]
    atomic_write(path, "\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench_annotate")
    ap.add_argument("--n-quality", type=int, default=200)
    ap.add_argument("--n-text", type=int, default=100)
    ap.add_argument("--n-throughput", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--n-sigint", type=int, default=800, help="images of the interrupted run (shards of 100)")
    ap.add_argument("--parts", default="quality,throughput,sigint")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "annotate_cpu.json"
    res: dict[str, Any] = json.loads(jpath.read_text()) if jpath.is_file() else {}
    res["environment"] = environment()
    res["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} nice -n {os.nice(0)} "
                      "python -m geomerase.benchmarks.bench_annotate " + " ".join(argv if argv is not None else sys.argv[1:]))
    parts = a.parts.split(",")
    if "quality" in parts:
        res["quality"] = run_quality(work, a.n_quality, a.n_text)
        atomic_write(jpath, json.dumps(res, indent=1))
    if "throughput" in parts:
        res["throughput"] = run_throughput(work, a.n_throughput, a.shard_size)
        atomic_write(jpath, json.dumps(res, indent=1))
    if "sigint" in parts:
        res["sigint"] = run_sigint(work, a.n_sigint)
    atomic_write(jpath, json.dumps(res, indent=1))
    write_md(res, out / "annotate_cpu.md")
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
