"""ICR of a finished demo's models against the classifier-free guidance scale.

    python -m geomerase.benchmarks.demo_cfg_probe runs/demo --out benchmarks/results/demo_cpu/cfg_probe.json

For each scale: the plain model on the held-out prompts and on the empty prompt (does guidance
suppress a concept the model learned?), the plain model on the held-out prompts with the
*base* model's unconditional branch (is it the fine-tuned unconditional branch that cancels the
concept?), and the geom model on the demo's open prompts under each negative prompt kind (how far each
negative steers away from it). Same seeds as the demo's arms, scored by the demo's scorer at the
demo's calibrated threshold (``metrics.json``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from geomerase.core.builtin import resolve_pretrained
from geomerase.core.captions import negative_mixture
from geomerase.core.classifiers import as_float, load_classifier
from geomerase.core.metrics import icr
from geomerase.core.models import load_model
from geomerase.core.sampling import SamplerConfig, sample, to_uint8
from geomerase.data.loader import InMemoryDataset
from geomerase.data.shards import atomic_write


def with_base_uncond(model, base) -> None:
    """Route the negative-prompt half of every guided UNet batch (``sampling.sample`` stacks the
    prompts, then one copy per negative) through ``base``'s UNet; the text encoders are the same."""
    own = model.denoise

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // 2
        return torch.cat([own(x[:b], t, cond[:b]), base.denoise(x[b:], t, cond[b:])])

    model.denoise = denoise


def probe(demo: Path, scales: list[float], n: int, steps: int) -> dict:
    metrics = json.loads((demo / "metrics.json").read_text())
    cfg = metrics["config"]
    scorer, _ = load_classifier(demo / "classifiers" / "scorer")
    scorer.cfg.decision_threshold = metrics["scorer_calibration"]["threshold"]
    held = InMemoryDataset(str(demo / "icd" / "heldout" / f"icd-{cfg['concept']}-*.tar"), 32, max_samples=n)
    prompts = [r.caption for r in held.records]
    seeds = list(range(10_000, 10_000 + len(prompts)))

    def score(model, ps: list[str], kind: str, scale: float) -> dict:
        negs, weights = negative_mixture(kind, cfg["concept_name"], cfg["grid"])
        imgs = sample(model, ps, negs, seeds, SamplerConfig(steps=steps, guidance_scale=scale), neg_weights=weights)
        return icr([bool(c) for c in scorer.cells(as_float(to_uint8(imgs)))])

    open_set = cfg.get("open_prompts") or [""]
    open_prompts = [open_set[i % len(open_set)] for i in range(len(prompts))]
    out: dict = {"threshold": scorer.threshold, "n": len(prompts), "steps": steps, "open_prompts": open_set,
                 "plain": {}, "geom_open": {}}
    plain, geom = load_model(demo / "models" / "plain" / "model"), load_model(demo / "models" / "geom" / "model")
    plain_base_uncond = load_model(demo / "models" / "plain" / "model")
    with_base_uncond(plain_base_uncond, load_model(resolve_pretrained(cfg["pretrained"])))
    for s in scales:
        out["plain"][str(s)] = {"heldout": score(plain, prompts, "none", s), "empty": score(plain, [""] * len(prompts),
                                                                                           "none", s),
                                "heldout_base_uncond": score(plain_base_uncond, prompts, "none", s)}
        out["geom_open"][str(s)] = {k: score(geom, open_prompts, k, s) for k in ("none", "name", "geom")}
        print(json.dumps({"scale": s, "plain": {k: v["icr"] for k, v in out["plain"][str(s)].items()},
                          "geom_open": {k: v["icr"] for k, v in out["geom_open"][str(s)].items()}}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a finished demo's output folder")
    ap.add_argument("--scales", default="1.0,2.0,3.0,6.0", help="comma-separated CFG scales")
    ap.add_argument("--n", type=int, default=64, help="samples per cell of the table")
    ap.add_argument("--steps", type=int, default=15, help="DDIM steps")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: DEMO/cfg_probe.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = probe(a.demo, [float(x) for x in a.scales.split(",")], a.n, a.steps)
    atomic_write(a.out or a.demo / "cfg_probe.json", json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
