"""Would another ICR scorer make a concept informative? Scorer variants on a finished erasing run.

    python -m geomerase.benchmarks.scorer_variants --run runs/bench_cpu --concept text --variants 32:600 48:1200

Each variant ``WIDTH:STEPS`` is a patch classifier trained as the benchmark trains its scorer (the
concept's own scorer split, seed 1, the first tenth held back for the F1 threshold), then held to the
benchmark's false-positive bound on the run's oracle calibration samples of each prompt set. Printed per
variant (one JSON line): the thresholds, and the image recall on the held-out real concept images,
degraded like samples, at the F1 threshold and at each bound (the benchmark's "informative" test needs
>= 0.8 at the bound). ``32:600`` is the cpu preset's own scorer and reproduces the run's numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from geomerase.benchmarks.erasing import PROMPT_SETS, ErasingConfig, Layout
from geomerase.benchmarks.erasing_run import scorer_job
from geomerase.core.classifiers import bounded_threshold, load_classifier, patch_classifier_quality
from geomerase.core.config import from_dict
from geomerase.data.loader import InMemoryDataset
from geomerase.stages import load_images


def run_config(run: Path) -> ErasingConfig:
    """The finished run's own configuration (``bench_config.json``), rooted at ``run``."""
    cfg = from_dict(ErasingConfig, json.loads((run / "bench_config.json").read_text()))
    cfg.out = str(run)
    return cfg


def calibration_files(lay: Layout, concept: str) -> dict[str, Path]:
    """The oracle's calibration samples of each prompt set (found by prompt set: a file's hash names the
    model folder it came from, which changes when a finished run is moved)."""
    out = {}
    for pset in PROMPT_SETS:
        found = sorted(lay.calibration(concept).glob(f"{pset}-*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(f"{lay.calibration(concept)}: {len(found)} calibration sample files for {pset}, "
                                    "need exactly 1 (is the run finished?)")
        out[pset] = found[0]
    return out


def evaluate(cfg: ErasingConfig, concept: str, width: int, steps: int, work: Path) -> dict:
    """Train (or reuse) one scorer variant and measure it as the benchmark does."""
    lay = Layout.of(cfg)
    out = work / f"scorer_{concept}_w{width}_s{steps}"
    t = time.time()
    if not (out / "model.safetensors").exists():
        job = scorer_job(cfg, lay, concept, width, steps, out)
        job.fn(*job.args)
    pc, _ = load_classifier(out)
    th = {p: bounded_threshold(pc, load_images(f), cfg.scorer_fpr)["threshold"]
          for p, f in calibration_files(lay, concept).items()}
    held = InMemoryDataset(lay.glob(f"{concept}_heldout", concept), cfg.resolution(concept))
    q = patch_classifier_quality(pc, held.images, held.metas, held.sizes, cfg.seed + 7, {"f1": pc.threshold, **th})
    return {"concept": concept, "width": width, "steps": steps, "seconds": round(time.time() - t),
            "thresholds": {k: round(v, 3) for k, v in th.items()}, "f1_threshold": round(pc.threshold, 3),
            **{f"recall_{k}": q[k]["images_degraded"]["recall"] for k in ("f1", *th)},
            **{f"precision_{k}": q[k]["images_degraded"]["precision"] for k in th}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished `geomerase bench erasing` output folder")
    ap.add_argument("--concept", required=True, choices=["qr", "watermark", "text"], help="concept to rescore")
    ap.add_argument("--variants", nargs="+", default=["32:600"], help="WIDTH:STEPS of each scorer variant")
    ap.add_argument("--work", default="runs/scorer_variants", help="where the variants are saved (reused)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = run_config(Path(a.run))
    for v in a.variants:
        width, steps = (int(x) for x in v.split(":"))
        print(json.dumps(evaluate(cfg, a.concept, width, steps, Path(a.work))), flush=True)


if __name__ == "__main__":
    main()
