"""Same plain-model samples, two scorers (session 2's and the current one): how much does ICR move?"""
import json
from pathlib import Path

import torch

from geomerase.core.classifiers import as_float, load_classifier
from geomerase.core.models import load_model
from geomerase.core.sampling import SamplerConfig, sample, to_uint8
from geomerase.data.loader import InMemoryDataset

torch.set_num_threads(1)
F = Path('/work/fresh/runs/demo'); OLD = Path('/work/main/runs/demo_final')
held = InMemoryDataset(str(F / 'icd' / 'heldout' / '*.tar'), 32)
n = 64
prompts = [r.caption for r in held.records][:n]
model = load_model(str(F / 'models' / 'plain' / 'model'))
imgs = to_uint8(sample(model, prompts, [""], list(range(10_000, 10_000 + n)), SamplerConfig(steps=15, guidance_scale=3.0)))
x = as_float(imgs)
out = {}
for name, d in (("current", F), ("session2", OLD)):
    pc, meta = load_classifier(d / 'classifiers' / 'patch')
    top = pc.cell_probs(x).flatten(1).amax(1)
    out[name] = {"threshold": pc.threshold, "icr": (top >= pc.threshold).float().mean().item(),
                 "flags": (top >= pc.threshold).tolist(), "top": top.tolist()}
a, b = torch.tensor(out["current"]["flags"]), torch.tensor(out["session2"]["flags"])
out["disagree"] = (a != b).float().mean().item()
out["near_threshold_current"] = ((torch.tensor(out["current"]["top"]) - out["current"]["threshold"]).abs() < 0.1).float().mean().item()
print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk in ("threshold", "icr")}) for k, v in out.items()}))
json.dump(out, open('/work/main/benchmarks/results/demo_cpu/scorer_swap.json', 'w'), indent=1)
