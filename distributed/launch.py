"""Launch plumbing for local multi-process runs: rendezvous env, torchrun commands, the
DeepSpeed op-build lock, and killing a launcher with all its ranks.

Used by the DeepSpeed backend (a process started without a launcher becomes a one-rank
group), by the ZeRO benchmarks and by the tests that start ``torchrun`` themselves.
Nothing here imports DeepSpeed.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger("geomerase.launch")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """A single process started without a launcher gets a one-rank group (DeepSpeed would look for MPI)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})


def _build_running(folder: Path) -> bool:
    """Whether some process works inside ``folder`` (torch runs ninja there while building)."""
    import psutil

    target = folder.resolve()
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and Path(cwd).resolve() == target:
            return True
    return False


def clear_stale_build_lock(min_age_s: float = 60.0) -> list[Path]:
    """Remove the ``lock`` an interrupted build of DeepSpeed's ``deepspeed_shm_comm`` op left.

    DeepSpeed's CPU group JIT-builds that op once (torch ``cpp_extension``); the build holds a
    plain ``lock`` file (no PID), and a build killed midway (a timeout, Ctrl-C) leaves it, so
    every later run waits on it forever, silently. A lock counts as stale when it is older
    than ``min_age_s`` and no process has its working directory in the build folder (the
    compiler runs there). Returns the locks removed; each removal is logged.
    """
    import time

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    removed = []
    for lock in root.glob("**/deepspeed_shm_comm/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        if age < min_age_s:
            continue
        if _build_running(lock.parent):
            log.warning("%s: a build is running in that folder (lock %.0f s old); waiting for it", lock, age)
            continue
        log.warning("%s: removing a lock %.0f s old that no running build holds (an interrupted build "
                    "left it; it would make this run wait forever)", lock, age)
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def rank_env(threads: int = 1) -> dict[str, str]:
    """Environment for ranks started with :func:`torchrun_cmd` from this process: ``threads``
    OpenMP threads per rank, DeepSpeed's one-time op build cached in one folder across runs,
    and no inherited ``RANK`` (torchrun sets it per rank)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "geomerase" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("RANK", None)
    return env


def torchrun_cmd(nproc: int, args: list[str], module: str = "geomerase.train") -> list[str]:
    """``torchrun --nproc_per_node N --master_port P -m MODULE ARGS`` on this interpreter; one
    process (no launcher) when ``nproc == 1``."""
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


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
    """SIGKILL ``pid`` and all its descendants, by PID (Linux ``/proc``); returns the PIDs signalled."""
    victims = [pid, *_descendants(pid)]
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims
