"""Data removal with LoRA vs fine-tuning the whole UNet: trainable parameters, optimizer state,
peak memory and step time on the CPU.

    python -m geomerase.benchmarks.lora_memory --out benchmarks/results

Both arms fine-tune the same model (``--pretrained``, default the shipped ``builtin:base32``) on
the same annotated Implicit Concept Dataset with the same batches; the text encoder is frozen
except the location-token rows in both (``train.train_text_encoder=false``), EMA off. ``full``
trains the whole UNet; ``lora-rN`` trains rank-N adapters on the attention projections
(``to_q, to_k, to_v, to_out.0``). Each arm runs in its own process so its peak resident set
(``ru_maxrss``) is its own; the table gives it and its rise over the RSS after the model is built.
Optimizer-state bytes are computed (AdamW: ``exp_avg`` + ``exp_avg_sq`` in fp32 per trainable
element, plus one step counter per tensor) and checked against the optimizer's actual tensors.
Results: ``lora_cpu.json`` and ``lora_cpu.md``; with ``--pretrained tiny-sdxl`` (a tiny random
SDXL-shaped pipeline, :func:`geomerase.core.sdxl.write_tiny_sdxl`: two text encoders, both with the
location rows) ``lora_sdxl_tiny_cpu.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from geomerase.data.shards import atomic_write


def make_data(root: Path, n: int, resolution: int) -> str:
    """``n`` annotated ICD images (QR codes in half, oracle boxes, grid 4) under ``root``; returns the shard glob."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    build_icd("qr", n, 0.5, resolution, 0, root / "raw", shard_size=n, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return str(root / "ann" / "*.tar")


def rss_mib() -> float:
    """Peak resident set of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """Train ``spec["steps"]`` steps of one arm in this process; returns its measurements."""
    from geomerase.core.config import load_config
    from geomerase.core.trainer import RunConfig, Trainer

    torch.set_num_threads(spec["threads"])
    cfg = load_config(RunConfig, None, [
        f"model.pretrained={spec['pretrained']}", "model.grid=4", f"data.shards={spec['shards']}",
        f"data.batch_size={spec['batch']}", f"out_dir={spec['out']}", "train.mode=data-removal",
        "train.train_text_encoder=false", "train.ema_decay=null", "train.warmup_steps=0",
        f"train.threads={spec['threads']}", f"train.lora.rank={spec['rank']}"])
    tr = Trainer(cfg)
    rss_built = rss_mib()
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    n_train = sum(p.numel() for p in params)
    times = []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        tr.train_step(step)
        times.append(time.perf_counter() - t0)
    state = tr.optimizer.state_dict()["state"].values()
    measured = sum(v.numel() * v.element_size() for s in state for v in s.values() if torch.is_tensor(v))
    return {"arm": spec["arm"], "rank": spec["rank"], "trainable_params": n_train,
            "unet_params": sum(p.numel() for n, p in tr.model.unet.named_parameters() if ".lora_" not in n),
            "optimizer_state_bytes": 2 * 4 * n_train + 4 * len(params),
            "optimizer_state_bytes_measured": measured, "grad_bytes": 4 * n_train,
            "rss_after_build_mib": round(rss_built, 1), "peak_rss_mib": round(rss_mib(), 1),
            "step_s_median": round(sorted(times[1:])[len(times[1:]) // 2], 3), "first_step_s": round(times[0], 3)}


def run_arm(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "geomerase.benchmarks.lora_memory", "--worker", json.dumps(spec)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], config: dict, env: dict) -> str:
    full = next(r for r in rows if r["arm"] == "full")
    lines = ["# LoRA vs full UNet fine-tuning, data removal (`python -m geomerase.benchmarks.lora_memory`)", "",
             f"- hardware: CPU only, {env['cpu_count']} cores ({config['threads']} torch thread), {env['host']}",
             f"- python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}",
             f"- model {config['pretrained']} ({full['unet_params']:,} UNet parameters), batch {config['batch']}, "
             f"{config['steps']} steps, text encoder(s) frozen except the 16 location rows, EMA off; {env['date']}", "",
             "| arm | trainable params | vs full | AdamW state (computed) | measured | grads | RSS built MiB | "
             "peak RSS MiB | peak - built MiB | step s (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['trainable_params']:,} | {r['trainable_params'] / full['trainable_params']:.2%} | "
            f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB | {r['optimizer_state_bytes_measured'] / 2**20:.2f} MiB | "
            f"{r['grad_bytes'] / 2**20:.2f} MiB | {r['rss_after_build_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['rss_after_build_mib']:.0f} | {r['step_s_median']} |")
    lines += ["", "Peak RSS is the whole process (Python, torch, the frozen model, activations); the trainable "
              "state is the part LoRA shrinks. RSS figures move by a few MiB between runs on this shared machine."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", default="builtin:base32",
                    help="model to fine-tune: builtin:NAME, a folder, or tiny-sdxl (default: builtin:base32)")
    ap.add_argument("--ranks", default="4,16", help="LoRA ranks, comma-separated (default: 4,16)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per arm (default: 6)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--out", default="benchmarks/results", help="where lora_cpu.json/.md go")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    import diffusers
    import peft

    from geomerase.core.builtin import pretrained_resolution

    config = {k: getattr(a, k) for k in ("pretrained", "ranks", "steps", "batch", "threads")}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.pretrained
        if model == "tiny-sdxl":
            from geomerase.core.sdxl import write_tiny_sdxl

            model = str(write_tiny_sdxl(Path(tmp) / "tiny-sdxl"))
        shards = make_data(Path(tmp), 4 * a.batch, pretrained_resolution(model))
        base = {"pretrained": model, "shards": shards, "batch": a.batch, "threads": a.threads, "steps": a.steps}
        arms = [("full", 0)] + [(f"lora-r{r}", int(r)) for r in a.ranks.split(",")]
        rows = [run_arm({**base, "arm": arm, "rank": rank, "out": f"{tmp}/{arm}"}) for arm, rank in arms]
    env = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "peft": peft.__version__, "cpu_count": len(os.sched_getaffinity(0)),
           "date": time.strftime("%Y-%m-%d")}
    out, stem = Path(a.out), "lora_sdxl_tiny_cpu" if a.pretrained == "tiny-sdxl" else "lora_cpu"
    atomic_write(out / f"{stem}.json", json.dumps({"environment": env, "config": config, "rows": rows}, indent=1) + "\n")
    atomic_write(out / f"{stem}.md", markdown(rows, config, env))
    print(markdown(rows, config, env))


if __name__ == "__main__":
    main()
