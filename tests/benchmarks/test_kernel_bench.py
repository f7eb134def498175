"""The kernel benchmark harnesses run on the CPU (Triton interpreter, one tiny shape) and write their tables."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,stem", [("bench_attention", "attention_tiny"),
                                         ("bench_loc_embedding", "loc_embedding_tiny_cpu")])
def test_tiny_benchmark_writes_results(tmp_path, module, stem):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", f"geomerase.benchmarks.{module}", "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert f"{stem}.json" in files and f"{stem}.md" in files, files
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    text = json.dumps(data)
    # Hardware/versions are recorded, and at least one measured time is a real number.
    assert "torch" in text
    times = [v for v in _numbers(data) if v > 0 and not math.isnan(v)]
    assert times, "no measured time in the results"


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def test_attention_profile_runs_without_gpu(tmp_path):
    # the gpu_check.sh profile stage on a CPU: Triton launches mocked, host cost and launch
    # counts per call recorded (one forward launch, two backward launches without a split)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "geomerase.benchmarks.profile_attention", "--out", str(tmp_path),
            "--batch", "1", "--calls", "5", "--shapes", "self-64-hd160"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "attention_profile_cpu.json").read_text())
    (row,) = data["rows"]
    assert row["backend"] == "triton" and row["fwd_launches"] == 1 and row["bwd_launches"] == 2
    assert row["fwd_host_us"] > 0 and row["bwd_host_us"] > 0
    assert not data["errors"], data["errors"]
