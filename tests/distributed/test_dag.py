"""The job runner: dependency order, resume by outputs, the process pool, progress and failures."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from geomerase.distributed.dag import Job, Task, last_step, pool_shape, run_dag


def _append(log: list, name: str) -> str:
    log.append(name)
    return name


def _write(path: str, after: str | None = None) -> int:
    """Write this process's pid to ``path``; with ``after``, fail unless that file exists already."""
    if after is not None and not Path(after).exists():
        raise RuntimeError(f"{after} missing: dependency not finished first")
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _count_to(path: str, n: int) -> int:
    with open(path, "w") as f:
        f.write("step,loss\n")
        for i in range(1, n + 1):
            f.write(f"{i},0.5\n")
            f.flush()
            time.sleep(0.01)
    return n


def test_inline_order_skip_and_unknown_dependency(tmp_path):
    done_file = tmp_path / "done"
    done_file.write_text("x")
    log: list[str] = []
    tasks = {"c": Task(Job(_append, (log, "c")), deps=("a", "b")), "a": Task(Job(_append, (log, "a"))),
             "b": Task(Job(_append, (log, "b")), deps=("a",)),
             "skip": Task(Job(_append, (log, "skip")), outputs=(str(done_file),))}
    timings: dict[str, float] = {}
    res = run_dag(tasks, workers=1, threads=1, timings=timings)
    assert log == ["a", "b", "c"] and set(res) == {"a", "b", "c"} and set(timings) == {"a", "b", "c"}
    with pytest.raises(KeyError, match="unknown task"):
        run_dag({"x": Task(Job(_append, (log, "x")), deps=("nope",))}, 1, 1)
    with pytest.raises(RuntimeError, match="cycle"):
        run_dag({"x": Task(Job(_append, (log, "x")), deps=("y",)), "y": Task(Job(_append, (log, "y")), deps=("x",))},
                1, 1)
    with pytest.raises(ValueError, match="workers and threads"):
        run_dag({}, 0, 1)


def test_pool_runs_in_other_processes_after_dependencies(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    tasks = {"a": Task(Job(_write, (a,)), outputs=(a,)), "b": Task(Job(_write, (b,)), outputs=(b,)),
             "c": Task(Job(_write, (c, a)), deps=("a",), outputs=(c,))}
    finished: list[str] = []
    res = run_dag(tasks, workers=2, threads=1, on_finish=finished.append)
    assert set(res) == {"a", "b", "c"} and os.getpid() not in res.values()
    assert finished.index("a") < finished.index("c")
    # A second run finds every output and runs nothing.
    assert run_dag(tasks, workers=2, threads=1) == {}


def test_pool_failure_names_the_task_and_lets_the_others_finish(tmp_path):
    ok = str(tmp_path / "ok")
    tasks = {"bad": Task(Job(_fail, ("boom",))), "ok": Task(Job(_write, (ok,)), outputs=(ok,)),
             "after_bad": Task(Job(_write, (str(tmp_path / "never"),)), deps=("bad",))}
    with pytest.raises(RuntimeError, match="task 'bad' failed.*boom"):
        run_dag(tasks, workers=2, threads=1)
    assert Path(ok).exists() and not (tmp_path / "never").exists()


def test_progress_file_counts_steps(tmp_path):
    f = tmp_path / "loss.csv"
    assert last_step(str(f)) == 0
    res = run_dag({"t": Task(Job(_count_to, (str(f), 30), str(f), 30), cost=3.0)}, workers=2, threads=1)
    assert res == {"t": 30} and last_step(str(f)) == 30
    f.write_text("step,loss\nnot-a-number,1\n")
    assert last_step(str(f)) == 0


def test_pool_shape_splits_cpu_threads_and_runs_inline_on_an_accelerator():
    cpu = torch.device("cpu")
    assert pool_shape(cpu, 2, 2) == (2, 1) and pool_shape(cpu, 2, 8) == (2, 4) and pool_shape(cpu, 4, 2) == (4, 1)
    assert pool_shape(cpu, 1, 2) == (1, 2) and pool_shape(torch.device("cuda"), 2, 8) == (1, 8)
