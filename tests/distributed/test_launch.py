"""Launch plumbing: the DeepSpeed op-build lock, torchrun commands, killing a process tree."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from geomerase.distributed.launch import clear_stale_build_lock, sigkill_tree, torchrun_cmd


def test_stale_build_lock_is_removed_and_a_running_build_is_not(tmp_path, monkeypatch):
    # A build of DeepSpeed's CPU comm op killed midway leaves `lock`; torch would wait on it
    # forever (a gpu_check dry run hung this way). Old and unheld: removed. Young, or with a
    # process working in the build folder (as ninja does): kept.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    assert clear_stale_build_lock(min_age_s=60) == [] and lock.exists()  # young: a build may be starting
    old = time.time() - 3600
    os.utime(lock, (old, old))
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=folder)
    try:
        deadline = time.time() + 10
        while psutil.Process(builder.pid).cwd() != str(folder.resolve()) and time.time() < deadline:
            time.sleep(0.05)
        assert clear_stale_build_lock(min_age_s=60) == [] and lock.exists()  # a build is running there
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_build_lock(min_age_s=60) == [lock] and not lock.exists()


def test_torchrun_cmd():
    one = torchrun_cmd(1, ["--config", "c.yaml"])
    assert one == [sys.executable, "-m", "geomerase.train", "--config", "c.yaml"]
    two = torchrun_cmd(2, ["--config", "c.yaml"], module="geomerase.other")
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert two[5] == "--master_port" and 0 < int(two[6]) < 65536
    assert two[7:] == ["-m", "geomerase.other", "--config", "c.yaml"]


def test_sigkill_tree_kills_grandchildren():
    # a parent whose child runs in its own session (as torchrun's workers may): both die
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 20
    while not psutil.Process(parent.pid).children() and time.time() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(parent.pid).children()
    victims = sigkill_tree(parent.pid)
    parent.wait(timeout=10)
    assert set(victims) == {parent.pid, child.pid}
    _, alive = psutil.wait_procs([child], timeout=10)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive)  # dead (a zombie until reaped)
