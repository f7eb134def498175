"""Helpers for launching ``geomerase.train`` under torchrun from the DeepSpeed tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict[str, str]:
    """One thread per rank; DeepSpeed's one-time op build cached across runs."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "geomerase" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m geomerase.train ARGS`` (raises with the output on failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "geomerase.train", "--no-progress", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (torchrun's workers may sit in their own process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def sigkill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants, by PID; returns the PIDs signalled."""
    victims = [pid, *_descendants(pid)]
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims
