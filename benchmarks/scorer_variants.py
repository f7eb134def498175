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
import glob
import json
import time
from pathlib import Path

import torch

from geomerase.core.classifiers import bounded_threshold, load_classifier, patch_classifier_quality
from geomerase.data.loader import InMemoryDataset
from geomerase.stages import load_images, patch_classifier_job


def _calibration(run: Path, concept: str) -> dict[str, str]:
    """The oracle calibration sample files of the concept's base, per prompt set."""
    base = json.loads((run / "bench_config.json").read_text())["pretrained"][concept].removeprefix("builtin:")
    out = {}
    for pset in ("heldout", "open"):
        found = glob.glob(str(run / "shared" / f"oracle-{base}" / "samples" / "calibration" / f"{pset}-*.safetensors"))
        if not found:
            raise FileNotFoundError(f"{run}: no oracle calibration samples for {pset} (is the run finished?)")
        out[pset] = found[0]
    return out


def evaluate(run: Path, concept: str, width: int, steps: int, work: Path, fpr: float = 0.05) -> dict:
    """Train (or reuse) one scorer variant and measure it as the benchmark does."""
    cfg = json.loads((run / "bench_config.json").read_text())
    res = 32 if cfg["pretrained"][concept] == "builtin:base32" else 64
    out = work / f"scorer_{concept}_w{width}_s{steps}"
    t = time.time()
    if not (out / "model.safetensors").exists():
        patch_classifier_job(str(run / "data" / f"{concept}_scorer" / f"icd-{concept}-*.tar"), res, cfg["grid"], steps,
                             cfg["seed"] + 1, str(out), concept, width, "icr-scorer", 0.1, "first", cfg["seed"] + 1)
    pc, _ = load_classifier(out)
    held = InMemoryDataset(str(run / "data" / f"{concept}_heldout" / f"icd-{concept}-*.tar"), res)
    th = {p: bounded_threshold(pc, load_images(f), fpr)["threshold"] for p, f in _calibration(run, concept).items()}
    q = patch_classifier_quality(pc, held.images, held.metas, held.sizes, cfg["seed"] + 7, {"f1": pc.threshold, **th})
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
    for v in a.variants:
        width, steps = (int(x) for x in v.split(":"))
        print(json.dumps(evaluate(Path(a.run), a.concept, width, steps, Path(a.work))), flush=True)


if __name__ == "__main__":
    main()
