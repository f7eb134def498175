"""Loader throughput: images/s of the webdataset (PIL) and DALI-CPU loaders on the same shards.

    OMP_NUM_THREADS=1 python -m geomerase.benchmarks.loader_throughput --shards 'runs/demo/annotated/*.tar' \
        --resolution 32 --batch 32 --batches 40 --out benchmarks/results

Both loaders produce the same stream (see ``geomerase.data.webdataset_loader``); the time is
from the first to the last of ``--batches`` batches after ``--warmup`` batches (start-up:
DataLoader workers / DALI pipeline build excluded). Results appended to ``loaders_cpu.json``
and rewritten as ``loaders_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from geomerase.data.loader import DataConfig
from geomerase.data.shards import atomic_write
from geomerase.data.sources import StreamSource


def measure(shards: str, loader: str, resolution: int, batch: int, batches: int, warmup: int, workers: int,
            threads: int, buffer: int) -> dict:
    cfg = DataConfig(shards=shards, batch_size=batch, loader=loader, workers=workers, dali_threads=threads,
                     shuffle_buffer=buffer)
    src = StreamSource(cfg, resolution, 4, lambda c, found, rng: c, 0, 0, 1)
    t_start = time.time()
    for step in range(warmup):
        src.batch(step, (0, 1))
    t0 = time.time()
    for step in range(warmup, warmup + batches):
        src.batch(step, (0, 1))
    dt = time.time() - t0
    return {"loader": loader, "images_per_s": batches * batch / dt, "seconds": dt, "startup_s": t0 - t_start,
            "batches": batches, "batch": batch, "resolution": resolution, "workers": workers,
            "dali_threads": threads if loader == "dali" else None, "shuffle_buffer": buffer}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="runs/demo/annotated/*.tar")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="DALI threads per pipeline")
    ap.add_argument("--buffer", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    rows = [measure(a.shards, loader, a.resolution, a.batch, a.batches, a.warmup, a.workers, a.threads, a.buffer)
            for loader in ("webdataset", "dali")]
    meta = {"shards": a.shards, "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "command": "python -m geomerase.benchmarks.loader_throughput " + " ".join(argv or sys.argv[1:])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "loaders_cpu.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({**meta, "results": rows})
    atomic_write(path, json.dumps(runs, indent=1))
    lines = ["# Loader throughput on CPU (same shards, same sample stream)", "",
             "| shards | resolution | batch | workers (streams) | loader | images/s | start-up s |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["results"]:
            lines.append(f"| {run['shards']} | {r['resolution']} | {r['batch']} | {r['workers']} | {r['loader']}"
                         f"{' (' + str(r['dali_threads']) + ' thread/pipeline)' if r['dali_threads'] else ''} | "
                         f"{r['images_per_s']:.0f} | {r['startup_s']:.1f} |")
    lines += ["", f"Machine: {meta['machine']}. Shared 2-core machine (other jobs running): compare loaders "
              "within one run, not across runs.", ""]
    (out / "loaders_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
