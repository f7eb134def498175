"""Same plain-model samples, two demo scorers: how much does the ICR move with the scorer's seed?

    python benchmarks/results/demo_cpu/scorer_swap.py RUN_A RUN_B --out scorer_swap.json

RUN_A and RUN_B are ``geomerase demo`` output folders. The plain model and held-out captions
come from RUN_A; both folders' patch classifiers (``classifiers/patch``) score the same 64
samples (the demo's seeds, CFG 3, 15 DDIM steps). Recorded run (2026-11-28): RUN_A = the
fresh-clone demo (current scorer), RUN_B = session 2's ``runs/demo_final``, whose plain model
is bit-identical.
"""
import argparse
import json
from pathlib import Path

import torch

from geomerase.core.classifiers import as_float, load_classifier
from geomerase.core.models import load_model
from geomerase.core.sampling import SamplerConfig, sample, to_uint8
from geomerase.data.loader import InMemoryDataset

ap = argparse.ArgumentParser()
ap.add_argument("run_a", type=Path)
ap.add_argument("run_b", type=Path)
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--out", type=Path, default=Path("scorer_swap.json"))
args = ap.parse_args()

torch.set_num_threads(1)
held = InMemoryDataset(str(args.run_a / "icd" / "heldout" / "*.tar"), 32)
n = args.n
prompts = [r.caption for r in held.records][:n]
model = load_model(str(args.run_a / "models" / "plain" / "model"))
imgs = to_uint8(sample(model, prompts, [""], list(range(10_000, 10_000 + n)), SamplerConfig(steps=15, guidance_scale=3.0)))
x = as_float(imgs)
out = {}
for name, d in (("current", args.run_a), ("session2", args.run_b)):
    pc, meta = load_classifier(d / "classifiers" / "patch")
    top = pc.cell_probs(x).flatten(1).amax(1)
    out[name] = {"threshold": pc.threshold, "icr": (top >= pc.threshold).float().mean().item(),
                 "flags": (top >= pc.threshold).tolist(), "top": top.tolist()}
a, b = torch.tensor(out["current"]["flags"]), torch.tensor(out["session2"]["flags"])
out["disagree"] = (a != b).float().mean().item()
cur = out["current"]
out["near_threshold_current"] = ((torch.tensor(cur["top"]) - cur["threshold"]).abs() < 0.1).float().mean().item()
print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk in ("threshold", "icr")})
                  for k, v in out.items()}))
args.out.write_text(json.dumps(out, indent=1))
