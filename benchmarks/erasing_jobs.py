"""Jobs of the erasing benchmark and a dependency-aware variant of the demo's job pool.

The benchmark has ~20 independent-ish stages per concept (data, three classifiers,
annotation, seven fine-tunes, one sampling job per model and prompt set) with
dependencies between them (ESD and model removal start from the plain model; sampling
needs its model). :func:`run_dag` runs them in one 1-thread process per core (as
:class:`geomerase.demo_jobs.JobPool` does, with the same worker initialiser) and starts
a task as soon as its dependencies are done, earliest-listed first, so the second core
never waits for a stage barrier. Tasks whose outputs exist are skipped (resume).

Job functions must be importable and picklable; each writes its outputs atomically.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from geomerase.demo_jobs import Job, coverage, init_worker


# -- the scheduler -------------------------------------------------------------------------
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


def run_dag(tasks: dict[str, Task], workers: int, threads: int, desc: str = "bench",
            timings: dict[str, float] | None = None, on_finish: Callable[[str], None] | None = None,
            cpu_times: dict[str, float] | None = None) -> dict[str, Any]:
    """Run every task whose outputs are missing, respecting ``deps``; returns ``{name: result}``.

    ``workers == 1`` runs everything inline in listing order (dependencies first). A failing
    task stops new submissions; running ones finish, then the first error is raised.
    ``timings[name]`` receives each task's wall seconds, ``cpu_times[name]`` its CPU seconds (what it
    would take alone on a free core with one thread: a measure that contention does not inflate);
    ``on_finish(name)`` runs after each task.
    """
    cpu_times = cpu_times if cpu_times is not None else {}
    missing = {d for t in tasks.values() for d in t.deps if d not in tasks}
    if missing:
        raise KeyError(f"tasks depend on unknown task(s) {sorted(missing)}")
    pending = [n for n, t in tasks.items() if not t.done()]
    finished = {n for n in tasks if n not in pending}
    results: dict[str, Any] = {}
    timings = timings if timings is not None else {}
    bar = tqdm(total=sum(tasks[n].cost for n in pending), desc=desc, unit="cost", dynamic_ncols=True)

    def run_inline(name: str) -> None:
        t0 = time.time()
        job = tasks[name].job
        results[name], cpu_times[name] = timed(job.fn, *job.args)
        timings[name] = time.time() - t0
        finished.add(name)
        bar.update(tasks[name].cost)
        if on_finish is not None:
            on_finish(name)

    def ready() -> list[str]:
        return [n for n in pending if all(d in finished for d in tasks[n].deps)]

    try:
        if workers <= 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                while pending:
                    r = ready()
                    if not r:
                        raise RuntimeError(f"dependency cycle among {pending}")
                    pending.remove(r[0])
                    bar.set_postfix_str(r[0])
                    run_inline(r[0])
            finally:
                torch.set_num_threads(prev)
            return results
        ctx = mp.get_context("spawn")
        running: dict[Future, tuple[str, float]] = {}
        error: BaseException | None = None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                 initargs=(threads,)) as ex:
            while pending or running:
                if error is None:
                    for name in ready():
                        if tasks[name].inline:
                            pending.remove(name)
                            run_inline(name)
                            continue
                        if len(running) >= workers:
                            continue
                        pending.remove(name)
                        job = tasks[name].job
                        running[ex.submit(timed, job.fn, *job.args)] = (name, time.time())
                    bar.set_postfix_str(",".join(n for n, _ in running.values())[:80])
                if not running:
                    if pending and error is None and not ready():
                        raise RuntimeError(f"dependency cycle or failed dependency among {pending}")
                    if error is not None or not pending:
                        break
                    continue
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in done:
                    name, t0 = running.pop(f)
                    try:
                        results[name], cpu_times[name] = f.result()
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        error = error or RuntimeError(f"task {name!r} failed: {e!r}")
                        error.__cause__ = e
                        continue
                    timings[name] = time.time() - t0
                    finished.add(name)
                    bar.update(tasks[name].cost)
                    if on_finish is not None:
                        on_finish(name)
        if error is not None:
            raise error
        return results
    finally:
        bar.close()


# -- jobs ------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def scorer_classifier_job(train_glob: str, res: int, grid: int, steps: int, seed: int, width: int, out_dir: str,
                          concept: str, calibration_share: float = 0.1) -> float:
    """The demo's patch-classifier job with a chosen width: the ICR scorer is a second patch
    classifier, wider and differently seeded than the annotator, trained on the same training split
    (with a held-back calibration share for its threshold). Returns seconds."""
    from geomerase.core.classifiers import (PatchClassifierConfig, calibrate_threshold, save_classifier,
                                            train_patch_classifier)
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    ds = InMemoryDataset(train_glob, res)
    pcfg = PatchClassifierConfig(resolution=res, grid=grid, width=width)
    cov = coverage(ds.metas, ds.sizes, grid, pcfg.overlap_threshold)
    # Hold back the *first* share (the annotator holds back the last one): different fitting data.
    n_cal = int(len(ds) * calibration_share) if len(ds) >= 20 else 0
    pc = train_patch_classifier(pcfg, ds.images[n_cal:], cov[n_cal:], steps=steps, batch=32, seed=seed,
                                progress=False)
    cal = calibrate_threshold(pc, ds.images[:n_cal], cov[:n_cal], degrade_seed=seed) if n_cal else {}
    save_classifier(pc, out_dir, {"concept": concept, "role": "icr-scorer",
                                  "calibration": {**cal, "n_images": n_cal}})
    return time.time() - t


def annotate_job(train_glob: str, classifier_dir: str, concept: str, concept_name: str, grid: int,
                 out_dir: str) -> dict:
    """Annotate the training shards with the patch classifier; returns the manifest totals."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.classifiers import load_classifier
    from geomerase.core.detectors import PatchClassifierDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer

    pc, _ = load_classifier(classifier_dir)
    annotator = Annotator(PatchClassifierDetector(concept, pc),
                          GeometryConfig(grid=grid, overlap_threshold=pc.cfg.overlap_threshold),
                          build_tokenizer(grid), concept_name)
    return annotate_shards(annotator, train_glob, out_dir, progress=False)["totals"]


def esd_job(model_dir: str, images_glob: str, cfg_dict: dict, out_dir: str, device: str) -> float:
    """ESD fine-tune of the model in ``model_dir`` (x_t from ``images_glob`` when the source is data)."""
    from geomerase.core.esd import ESDConfig, run_esd
    from geomerase.core.models import load_model
    from geomerase.core.trainer import resolve_device
    from geomerase.data.loader import InMemoryDataset

    t = time.time()
    cfg = ESDConfig(**cfg_dict)
    model = load_model(model_dir)
    images = InMemoryDataset(images_glob, model.resolution).images if cfg.xt_source == "data" else None
    torch.manual_seed(cfg.seed)
    run_esd(model.to(resolve_device(device)), cfg, out_dir, images)
    return time.time() - t


@dataclass
class ArmSpec:
    """One sampling arm of one model."""

    name: str
    """File stem of the arm's samples (e.g. ``np`` or ``geom@1.5``)."""
    prompts: list[str]
    """One prompt per sample."""
    negatives: list[str]
    """Negative prompt mixture."""
    weights: list[float]
    """Its weights."""
    guidance_scale: float
    """CFG scale."""
    sld_concept: str | None = None
    """When set, SLD guidance away from this prompt (with ``sld``)."""
    sld: dict = field(default_factory=dict)
    """SLDConfig fields."""


def sample_job(model_dir: str, device: str, backend: str, arms: list[ArmSpec], seeds: list[int], steps: int,
               batch_size: int, out_dir: str) -> dict[str, float]:
    """Sample each arm with the same seeds; ``out_dir/<arm>.pt`` holds ``(N, 3, R, R)`` uint8.

    Arms whose file exists are skipped. Returns seconds per arm sampled.
    """
    from geomerase.core.guidance import SLDConfig, SLDGuidance
    from geomerase.core.models import load_model
    from geomerase.core.sampling import SamplerConfig, sample, to_uint8
    from geomerase.core.trainer import resolve_device

    model = None
    out: dict[str, float] = {}
    for arm in arms:
        path = Path(out_dir) / f"{arm.name}.pt"
        if path.exists():
            continue
        if model is None:
            model = load_model(model_dir).to(resolve_device(device))
            model.set_attention_backend(backend)
        t = time.time()
        hook = SLDGuidance(arm.sld_concept, SLDConfig(**arm.sld)) if arm.sld_concept else None
        scfg = SamplerConfig(steps=steps, guidance_scale=arm.guidance_scale, batch_size=batch_size)
        imgs = sample(model, arm.prompts, arm.negatives, seeds[:len(arm.prompts)], scfg, neg_weights=arm.weights,
                      guidance=hook)
        atomic_torch_save(to_uint8(imgs), path)
        out[arm.name] = time.time() - t
    return out


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Indirection for inline tasks that call a bound method or closure."""
    return fn(*args)
