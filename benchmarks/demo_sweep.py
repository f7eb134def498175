"""Sweep of the demo's free choices on a GPU (or CPU): caption variants, steps, negatives, CFG.

Reuses one prepared data folder (ICD, classifiers, annotated shards from
``geomerase demo prepare_only=true``) and trains each variant's models once.
Writes ``<out>/sweep.json`` with every variant's metrics.

    python -m geomerase.benchmarks.demo_sweep --data runs/prep --out runs/sweep --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from geomerase.core.captions import CaptionConfig
from geomerase.demo import DemoConfig, run_demo

VARIANTS = {
    # name: (steps, caption config, share the plain model of)
    "aug600": (600, CaptionConfig(mode="geom", concept_first_prob=0.2, concept_only_prob=0.1, shuffle_cells=True), None),
    "paper600": (600, CaptionConfig(mode="geom"), "aug600"),
    "aug1200": (1200, CaptionConfig(mode="geom", concept_first_prob=0.2, concept_only_prob=0.1, shuffle_cells=True),
                None),
}


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps (smoke runs)")
    ap.add_argument("--sample-steps", type=int, default=25)
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    for name in a.variants.split(","):
        steps, caps, share = VARIANTS[name]
        vdir = out / name
        for part in ("icd", "classifiers", "annotated"):
            link(Path(a.data) / part, vdir / part)
        if share:
            link(out / share / "models" / "plain", vdir / "models" / "plain")
        t = time.time()
        cfg = DemoConfig(out=str(vdir), steps=max(1, int(steps * a.steps_scale)), sample_steps=a.sample_steps, samples=a.samples, captions=caps, device=a.device,
                         threads=a.threads, extra_negatives=["geom-multi", "geom-cells", "geom-seen"],
                         guidance_sweep=[1.5, 3.0, 5.0, 7.5])
        m = run_demo(cfg)
        results[name] = {"icr": m["icr"], "fidelity": m["fidelity"], "icr_vs_guidance": m["icr_vs_guidance"],
                         "seconds": time.time() - t, "timings": m["timings"]}
        (out / "sweep.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {"icr": v["icr"], "fid": {x: v["fidelity"][x] for x in ("plain", "geom")}}
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
