"""ZeRO on CPU (gloo) vs the single-process loop, and exact resume after SIGKILL.

    OMP_NUM_THREADS=1 python -m geomerase.benchmarks.zero_equivalence --out benchmarks/results

Runs, on the ``debug`` model with the same global batch and seed, ``--steps`` (20) steps of
(1) the single-process loop, (2) ZeRO-2 with 2 processes, (3) ZeRO-3 with 2 processes
(``torchrun``), then (4) a ZeRO-2 run killed with SIGKILL (launcher and both ranks) once its
step-``--kill-after`` checkpoint exists, resumed with ``--resume latest``. Writes
``zero_cpu.json`` and ``zero_cpu.md``: per-step losses, max relative loss difference, max
differences of the final weights and Adam moments, and whether the resumed steps are
bit-identical to the uninterrupted ZeRO-2 run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from geomerase.distributed.launch import rank_env, sigkill_tree, torchrun_cmd

ROOT = Path(__file__).resolve().parents[1]


def _cmd(nproc: int, config: str, overrides: list[str], resume: bool = False) -> list[str]:
    return torchrun_cmd(nproc, ["--no-progress", "--config", config, *(["--resume", "latest"] if resume else []),
                                *overrides])


def _run(cmd: list[str]) -> float:
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return time.time() - t


def _losses(out: Path) -> dict[int, float]:
    with open(out / "loss.csv") as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def _state(out: Path, step: int) -> dict[str, torch.Tensor]:
    ck = out / "checkpoints" / f"step-{step:06d}"
    sd = {f"unet.{k}": v for k, v in load_file(str(ck / "model/unet/diffusion_pytorch_model.safetensors")).items()}
    sd.update({f"text.{k}": v for k, v in load_file(str(ck / "model/text_encoder/model.safetensors")).items()})
    sd.update({f"opt.{k}": v for k, v in load_file(str(ck / "optimizer.safetensors")).items()})
    sd.update({f"ema.{k}": v for k, v in load_file(str(ck / "extra.safetensors")).items()})
    return sd


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for prefix in ("unet.", "text.", "opt.", "ema."):
        keys = [k for k in a if k.startswith(prefix)]
        assert set(keys) == {k for k in b if k.startswith(prefix)}, prefix
        absd = max((a[k].float() - b[k].float()).abs().max().item() for k in keys)
        scale = max(a[k].float().abs().max().item() for k in keys)
        out[prefix.rstrip(".")] = {"max_abs_diff": absd, "max_abs_value": scale}
    return out


def _kill_after(cmd: list[str], out: Path, step: int) -> dict:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=rank_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = out / "checkpoints" / f"step-{step:06d}"
    while not target.is_dir() and proc.poll() is None:
        time.sleep(0.05)
    victims = sigkill_tree(proc.pid)
    proc.wait()
    if (out / "model").exists():
        sys.exit(f"the run finished before the kill (checkpoint {target} never seen in time); nothing to resume")
    logged = max(_losses(out)) if (out / "loss.csv").is_file() else 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    return {"killed_with": f"SIGKILL to the launcher and both ranks ({len(victims)} processes)",
            "last_logged_step_at_kill": logged,
            "checkpoints_at_kill": ckpts, "returncode": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kill-after", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--resume-zero3", action="store_true", help="also SIGKILL + resume a ZeRO-3 run")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="zero_eq_"))
    icd = work / "icd"
    if not (icd / "ann").is_dir():
        from geomerase.core.annotate import Annotator, annotate_shards
        from geomerase.core.detectors import OracleDetector
        from geomerase.core.geometry import GeometryConfig
        from geomerase.core.tokenizer import build_tokenizer
        from geomerase.data.icd import build_icd

        build_icd("qr", 96, 0.5, 32, 0, icd / "raw", shard_size=24, progress=False)
        ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4),
                        "qr code")
        annotate_shards(ann, str(icd / "raw" / "*.tar"), icd / "ann", progress=False)
    common = ["model.size=debug", "model.prediction_type=null", f"data.shards={icd}/ann/*.tar",
              f"data.batch_size={a.batch}", f"train.max_steps={a.steps}", "train.log_every=1",
              "train.warmup_steps=4", "train.threads=1", "train.tensorboard=false", "train.keep_checkpoints=100"]
    save = [f"train.save_every={a.steps // 5}"]
    runs = {
        "single": (1, "configs/tiny_cpu_zero2.yaml", ["train.backend=local"]),
        "zero2": (2, "configs/tiny_cpu_zero2.yaml", []),
        "zero3": (2, "configs/tiny_cpu_zero3.yaml", []),
    }
    seconds = {}
    for name, (n, config, extra) in runs.items():
        out = work / name
        if not (out / "model").is_dir():
            seconds[name] = _run(_cmd(n, config, [*common, *save, *extra, f"out_dir={out}"]))
    # SIGKILL after step kill_after, then --resume latest.
    killed = work / "zero2_killed"
    shutil.rmtree(killed, ignore_errors=True)
    kill_cmd = _cmd(2, "configs/tiny_cpu_zero2.yaml", [*common, f"train.save_every={a.kill_after}",
                                                        f"out_dir={killed}"])
    kill_info = _kill_after(kill_cmd, killed, a.kill_after)
    seconds["zero2_resume"] = _run(_cmd(2, "configs/tiny_cpu_zero2.yaml",
                                        [*common, f"train.save_every={a.kill_after}", f"out_dir={killed}"], resume=True))
    # The same for ZeRO-3 (its optimizer state lives in per-sub-group fp32 partitions).
    killed3 = work / "zero3_killed"
    if a.resume_zero3:
        shutil.rmtree(killed3, ignore_errors=True)
        kill3 = _kill_after(_cmd(2, "configs/tiny_cpu_zero3.yaml", [*common, f"train.save_every={a.kill_after}",
                                                                     f"out_dir={killed3}"]), killed3, a.kill_after)
        seconds["zero3_resume"] = _run(_cmd(2, "configs/tiny_cpu_zero3.yaml", [*common, f"train.save_every={a.kill_after}",
                                                                               f"out_dir={killed3}"], resume=True))

    ref = _losses(work / "single")
    result: dict = {"steps": a.steps, "global_batch": a.batch, "model": "debug", "precision": "fp32",
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                    "seconds": seconds, "losses": {"single": [ref[s] for s in sorted(ref)]}}
    for name in ("zero2", "zero3"):
        other = _losses(work / name)
        rel = max(abs(other[s] - ref[s]) / abs(ref[s]) for s in ref)
        result["losses"][name] = [other[s] for s in sorted(other)]
        result[name] = {"max_rel_loss_diff": rel, "within_1e-4": rel <= 1e-4,
                        "state_after_last_step": _compare(_state(work / "single", a.steps),
                                                          _state(work / name, a.steps))}
    z2 = _losses(work / "zero2")
    res = _losses(killed)
    tail = list(range(a.kill_after + 1, a.steps + 1))
    result["resume"] = {**kill_info, "steps_compared": tail,
                        "losses_uninterrupted": [z2[s] for s in tail], "losses_resumed": [res[s] for s in tail],
                        "bit_identical": all(z2[s] == res[s] for s in tail),
                        "final_state": _compare(_state(work / "zero2", a.steps), _state(killed, a.steps))}
    if a.resume_zero3:
        z3, res3 = _losses(work / "zero3"), _losses(killed3)
        result["resume_zero3"] = {**kill3, "steps_compared": tail,
                                  "losses_uninterrupted": [z3[s] for s in tail], "losses_resumed": [res3[s] for s in tail],
                                  "bit_identical": all(z3[s] == res3[s] for s in tail),
                                  "final_state": _compare(_state(work / "zero3", a.steps), _state(killed3, a.steps))}
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "zero_cpu.json").write_text(json.dumps(result, indent=1))
    (outdir / "zero_cpu.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    lines = [f"# ZeRO on CPU (gloo) vs single process — {r['model']} model, {r['steps']} steps, "
             f"global batch {r['global_batch']}, {r['precision']}", "",
             f"Machine: {r['machine']}. Produced by `python -m geomerase.benchmarks.zero_equivalence`.", "",
             "| run | max relative loss diff vs single | within 1e-4 | max abs diff of weights / Adam moments / EMA "
             "after the last step |", "|---|---|---|---|"]
    for name in ("zero2", "zero3"):
        s = r[name]["state_after_last_step"]
        lines.append(f"| {name} (2 processes) | {r[name]['max_rel_loss_diff']:.2e} | {r[name]['within_1e-4']} | "
                     f"unet {s['unet']['max_abs_diff']:.1e}, text {s['text']['max_abs_diff']:.1e}, "
                     f"optimizer {s['opt']['max_abs_diff']:.1e}, EMA {s['ema']['max_abs_diff']:.1e} |")
    rs = r["resume"]
    lines += ["", f"SIGKILL of a 2-process ZeRO-2 run once checkpoint step {rs['steps_compared'][0] - 1} existed "
              f"(last logged step at the kill: {rs['last_logged_step_at_kill']}), then `--resume latest`: "
              f"steps {rs['steps_compared'][0]}–{rs['steps_compared'][-1]} bit-identical to the uninterrupted run: "
              f"**{rs['bit_identical']}**; final state max abs diff: "
              + ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in rs["final_state"].items()) + ".", "",
              ]
    r3 = r.get("resume_zero3")
    lines += [] if r3 is None else [f"The same for ZeRO-3: steps {r3['steps_compared'][0]}–{r3['steps_compared'][-1]} bit-identical: "
              f"**{r3['bit_identical']}**; final state max abs diff: "
              + ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in r3["final_state"].items()) + ".", ""]
    lines += ["| step | single | zero2 | zero3 |", "|---|---|---|---|"]
    for i, (a, b, c) in enumerate(zip(r["losses"]["single"], r["losses"]["zero2"], r["losses"]["zero3"]), 1):
        lines.append(f"| {i} | {a:.8f} | {b:.8f} | {c:.8f} |")
    lines += ["", "Wall-clock seconds of the runs this invocation made (2 shared, loaded cores; includes start-up; "
              "runs found complete in `--work` are reused, not re-timed): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
