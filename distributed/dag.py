"""The one job runner: a dependency graph of tasks run in one process per CPU core.

The demo and the erasing benchmark are compute-bound stages (data, classifiers, annotation,
fine-tunes, sampling) with dependencies between them. On the 2-core CPU one process with two
torch threads uses the cores poorly, so :func:`run_dag` runs ready tasks in a pool of
``workers`` spawned processes of ``threads`` torch threads each, starts a task as soon as its
dependencies are done (earliest-listed first, so a core never waits for a stage barrier), and
skips tasks whose outputs exist (resume). ``workers == 1`` runs everything inline in this
process (a GPU run).

Job functions must be importable and picklable; each writes its outputs atomically, so an
interrupted run resumes from what was written.
"""
from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

POLL_SECONDS = 2.0
"""How often the progress bar reads the running tasks' progress files."""


def init_worker(threads: int) -> None:
    """Runs once in every pool process: pin torch's thread count, keep logs quiet."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)


def pool_shape(device: torch.device, workers: int, threads: int) -> tuple[int, int]:
    """``(processes, torch threads each)`` for :func:`run_dag`: ``workers`` processes sharing ``threads``
    on the CPU; one inline process with all ``threads`` when the work runs on an accelerator."""
    if device.type != "cpu" or workers <= 1:
        return 1, max(1, threads)
    return workers, max(1, threads // workers)


@dataclass
class Job:
    """One unit of work: ``fn(*args)`` (importable and picklable when it runs in a pool process)."""

    fn: Callable[..., Any]
    args: tuple = ()
    progress_file: str | None = None
    """Optional CSV whose last row's first column is the job's current step (shown as progress)."""
    total: int = 0
    """Steps the progress file counts to."""


@dataclass
class Task:
    """A job with dependencies and a completion check."""

    job: Job
    """What to run (in a pool process, or in this process when ``inline``)."""
    deps: tuple[str, ...] = ()
    """Names of tasks that must finish first."""
    outputs: tuple[str, ...] = ()
    """Files whose existence means the task is done (skipped on resume); empty: always run."""
    inline: bool = False
    """Run in the main process (light work that needs the main process's state, e.g. scoring)."""
    cost: float = 1.0
    """Relative cost, for the progress bar."""

    def done(self) -> bool:
        return bool(self.outputs) and all(Path(p).exists() for p in self.outputs)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``(fn(*args), CPU seconds of this process spent in it)`` (all its threads; picklable)."""
    c0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - c0


def last_step(path: str | None) -> int:
    """The first column of the last data row of a CSV progress file (0 when absent or unreadable)."""
    if not path or not os.path.exists(path):
        return 0
    try:
        with open(path) as f:
            rows = list(csv.reader(f))
        return int(float(rows[-1][0])) if len(rows) > 1 else 0
    except (OSError, ValueError, IndexError):
        return 0


class _Progress:
    """One bar over all tasks in cost units; a running task with a progress file counts its share."""

    def __init__(self, tasks: dict[str, Task], pending: list[str], desc: str):
        self.tasks = tasks
        self.bar = tqdm(total=sum(tasks[n].cost for n in pending), desc=desc, unit="cost", dynamic_ncols=True)
        self.finished = 0.0
        self._shown: tuple[float, str] | None = None

    def partial(self, name: str) -> float:
        job = self.tasks[name].job
        if not job.progress_file or not job.total:
            return 0.0
        return self.tasks[name].cost * min(last_step(job.progress_file), job.total) / job.total

    def show(self, running: list[str]) -> None:
        """Redraw when the count or the running set changed (a log file gets one line per change)."""
        n, names = round(self.finished + sum(self.partial(n) for n in running), 1), ",".join(running)[:80]
        if (n, names) == self._shown:
            return
        self._shown = (n, names)
        self.bar.n = n
        self.bar.set_postfix_str(names, refresh=False)
        self.bar.refresh()

    def finish(self, name: str) -> None:
        self.finished += self.tasks[name].cost
        self.show([])

    def close(self) -> None:
        self.bar.close()


def run_dag(tasks: dict[str, Task], workers: int, threads: int, desc: str = "jobs",
            timings: dict[str, float] | None = None, on_finish: Callable[[str], None] | None = None,
            cpu_times: dict[str, float] | None = None) -> dict[str, Any]:
    """Run every task whose outputs are missing, respecting ``deps``; returns ``{name: result}``.

    ``workers == 1`` runs everything inline in listing order (dependencies first). A failing
    task stops new submissions; running ones finish, then the first error is raised.
    ``timings[name]`` receives each task's wall seconds, ``cpu_times[name]`` its CPU seconds (what it
    would take alone on a free core with one thread: a measure that contention does not inflate);
    ``on_finish(name)`` runs after each task.
    """
    if workers < 1 or threads < 1:
        raise ValueError(f"workers and threads must be >= 1, got {workers}, {threads}")
    missing = {d for t in tasks.values() for d in t.deps if d not in tasks}
    if missing:
        raise KeyError(f"tasks depend on unknown task(s) {sorted(missing)}")
    state = _State(tasks, timings, cpu_times, on_finish)
    progress = _Progress(tasks, state.pending, desc)
    state.progress = progress
    try:
        if workers == 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                while state.pending:
                    ready = state.ready()
                    if not ready:
                        raise RuntimeError(f"dependency cycle among {state.pending}")
                    state.run_inline(ready[0])
            finally:
                torch.set_num_threads(prev)
        else:
            _run_pool(state, workers, threads)
        return state.results
    finally:
        progress.close()


class _State:
    """Pending, finished and results of one :func:`run_dag` call."""

    def __init__(self, tasks: dict[str, Task], timings: dict | None, cpu_times: dict | None,
                 on_finish: Callable[[str], None] | None):
        self.tasks = tasks
        self.pending = [n for n, t in tasks.items() if not t.done()]
        self.finished = {n for n in tasks if n not in self.pending}
        self.results: dict[str, Any] = {}
        self.timings = timings if timings is not None else {}
        self.cpu_times = cpu_times if cpu_times is not None else {}
        self.on_finish = on_finish
        self.progress: _Progress | None = None

    def ready(self) -> list[str]:
        return [n for n in self.pending if all(d in self.finished for d in self.tasks[n].deps)]

    def complete(self, name: str, result: Any, cpu: float, t0: float) -> None:
        self.results[name], self.cpu_times[name] = result, cpu
        self.timings[name] = time.time() - t0
        self.finished.add(name)
        self.progress.finish(name)
        if self.on_finish is not None:
            self.on_finish(name)

    def run_inline(self, name: str) -> None:
        self.pending.remove(name)
        self.progress.show([name])
        t0 = time.time()
        job = self.tasks[name].job
        self.complete(name, *timed(job.fn, *job.args), t0)


def _run_pool(state: _State, workers: int, threads: int) -> None:
    """Submit ready tasks to ``workers`` spawned processes until all are done or one failed."""
    running: dict[Future, tuple[str, float]] = {}
    error: BaseException | None = None
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                             initargs=(threads,)) as ex:
        while state.pending or running:
            if error is None:
                for name in state.ready():
                    if state.tasks[name].inline:
                        state.run_inline(name)
                    elif len(running) < workers:
                        state.pending.remove(name)
                        job = state.tasks[name].job
                        running[ex.submit(timed, job.fn, *job.args)] = (name, time.time())
            if not running:
                if error is not None or not state.pending:
                    break
                if not state.ready():
                    raise RuntimeError(f"dependency cycle or failed dependency among {state.pending}")
                continue
            state.progress.show([n for n, _ in running.values()])
            done, _ = wait(list(running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for f in done:
                name, t0 = running.pop(f)
                try:
                    result, cpu = f.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    error = error or RuntimeError(f"task {name!r} failed: {e!r}")
                    error.__cause__ = e
                    continue
                state.complete(name, result, cpu, t0)
    if error is not None:
        raise error
