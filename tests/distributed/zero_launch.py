"""Helpers for launching ``geomerase.train`` under torchrun from the DeepSpeed tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

from geomerase.distributed.launch import free_port, rank_env, sigkill_tree, torchrun_cmd

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["ROOT", "free_port", "rank_env", "sigkill_tree", "torchrun"]


def torchrun(nproc: int, args: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m geomerase.train ARGS`` (raises with the output on failure)."""
    cmd = torchrun_cmd(nproc, ["--no-progress", *args])
    r = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r
