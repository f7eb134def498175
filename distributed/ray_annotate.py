"""Annotation over webdataset shards with a Ray actor pool: resumable and exactly-once.

``geomerase annotate --engine ray [--address auto|HOST:PORT] --num-workers N ...``

* Each actor builds its :class:`~geomerase.core.annotate.Annotator` (detector,
  classifier weights, tokenizer) once, then annotates whole shards with the same
  :func:`~geomerase.core.annotate.annotate_shard` the local engine runs, so both
  engines write byte-identical shards.
* Output shards are one-to-one with input shards and written by the workers
  atomically (temp file, rename); the driver alone writes ``DIR/_manifest.json``
  after each shard returns, which is the commit point. A rerun skips committed
  shards; anything half-written by a killed run is a stale temp file, removed.
* A worker that dies mid-shard (killed, out of memory) fails that shard's task;
  the driver re-queues the shard (up to ``max_retries`` times), Ray restarts the
  actor or the driver replaces it, and the redone shard overwrites nothing
  committed, so the output stays complete and duplicate-free.
* Without ``address`` an embedded local Ray is started (``ray.init(address="local",
  num_cpus=...)``) and shut down at the end; with ``auto`` or ``HOST:PORT`` the job
  joins a running cluster (``ray start --head``), whose nodes must see the input and
  output folders at the same paths.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from geomerase.core.annotate import (Annotator, annotate_shard, clean_stale_temps, finalize_manifest,
                                     load_manifest, pending_shards, save_manifest, throughput_line)
from geomerase.core.geometry import GeometryConfig
from geomerase.data.shards import expand_urls

log = logging.getLogger("geomerase.ray_annotate")


@dataclass
class AnnotatorSpec:
    """A picklable recipe for an :class:`Annotator`, built once inside each worker."""

    detector: str = "qr"
    """Detector registry name, ``module:Class``, or comma-separated list (see ``build_detector``)."""
    concept: str = "qr"
    """Concept for detectors that take one (oracle, patch-classifier)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Detector options (``classifier=PATH``, ``require_decode=true``, ``text.min_conf=50`` ...)."""
    concept_name: str | dict[str, str] | None = None
    """Caption phrase (or one per concept); None: the ICD's names."""
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    """Grid and cell-coverage rule."""

    def build(self) -> Annotator:
        """Detector + tokenizer + geometry encoder."""
        from geomerase.core.detectors import MultiDetector, build_detector
        from geomerase.core.tokenizer import build_tokenizer
        from geomerase.data.concepts import CONCEPT_NAMES

        det = build_detector(self.detector, self.concept, **self.options)
        if isinstance(det, MultiDetector) or isinstance(self.concept_name, Mapping):
            name: Any = dict(self.concept_name or {})
        else:
            name = self.concept_name or CONCEPT_NAMES.get(det.concept, det.concept)
        return Annotator(det, self.geometry, build_tokenizer(self.geometry.grid), name)


@dataclass
class RayAnnotateConfig:
    """How the Ray job runs."""

    num_workers: int = 2
    """Actors in the pool (each loads the detector once and takes one CPU)."""
    address: str | None = None
    """None: embedded local Ray; 'auto' or 'HOST:PORT': join a running cluster."""
    num_cpus: int | None = None
    """CPUs of the embedded Ray (None: num_workers)."""
    batch_size: int = 64
    """Images per detector call inside a worker."""
    max_retries: int = 3
    """Times one shard is re-run after its worker died before the job fails."""
    object_store_mb: int = 128
    """Object store of the embedded Ray (only shard counts travel through it)."""
    progress: bool = True
    """Show a progress bar (shards, images/s)."""

    def validate(self) -> None:
        if self.num_workers < 1 or self.batch_size < 1 or self.max_retries < 0:
            raise ValueError(f"ray annotate: need num_workers >= 1, batch_size >= 1, max_retries >= 0 ({self})")


class AnnotateWorker:
    """The actor body: one Annotator per process, whole shards per call."""

    def __init__(self, spec: AnnotatorSpec):
        self.annotator = spec.build()

    def pid(self) -> int:
        """Process id (tests kill it to simulate a crashed worker)."""
        return os.getpid()

    def run(self, shard: str, out_path: str, batch_size: int) -> dict[str, Any]:
        """Annotate ``shard`` into ``out_path``; returns the shard's manifest counts."""
        counts = annotate_shard(self.annotator, shard, Path(out_path), batch_size)
        counts["worker_pid"] = os.getpid()
        return counts


def start_ray(cfg: RayAnnotateConfig) -> tuple[bool, float]:
    """Connect to / start Ray; returns (whether this call started it, seconds it took)."""
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return False, 0.0
    # On a loaded 2-core machine the raylet's wait for its agents can exceed Ray's default
    # (seen: "Timed out waiting for file .../metrics_agent_port"); allow more.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    # Ray waits a fixed 30 s for its raylet to register; a starved machine can miss that: retry.
    for attempt in range(3):
        try:
            if cfg.address is None:
                ray.init(address="local", num_cpus=cfg.num_cpus or cfg.num_workers, include_dashboard=False,
                         object_store_memory=cfg.object_store_mb * 1024 * 1024, logging_level=logging.WARNING,
                         configure_logging=False)
            else:
                ray.init(address=cfg.address, logging_level=logging.WARNING, configure_logging=False)
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            log.warning("Ray start-up timed out (attempt %d/3, machine busy?); retrying", attempt + 1)
            ray.shutdown()
    return True, time.perf_counter() - t0


class _ShardScheduler:
    """Hands shards to idle actors and takes results back, exactly once per shard.

    A shard whose actor dies goes back to the front of the queue (at most ``max_retries`` times);
    the dead actor is probed with ``pid()``: Ray restarts it (it rejoins the idle set) or, if the
    probe fails, a fresh actor replaces it (at most ``max_retries`` replacements per worker). Each
    finished shard is committed to the manifest before the next result is read.
    """

    def __init__(self, ray: Any, worker_cls: Any, spec: AnnotatorSpec, actors: list, todo: list[str], out: Path,
                 cfg: RayAnnotateConfig, manifest: dict) -> None:
        self.ray, self.worker_cls, self.spec = ray, worker_cls, spec
        self.out, self.cfg, self.manifest = out, cfg, manifest
        self.actors, self.n = actors, len(actors)
        self.idle: deque = deque(actors)
        self.queue: deque[str] = deque(todo)
        self.attempts: dict[str, int] = {}
        self.pending: dict[Any, tuple[str, Any]] = {}
        self.probes: dict[Any, Any] = {}  # pid() call -> actor coming back from a crash (Ray restarts it)
        self.images = 0
        self.replaced = 0

    def run(self, bar: Any, t0: float) -> None:
        """Until every shard is committed; raises when shards or workers exhaust their retries."""
        while self.queue or self.pending:
            if not self.pending and not self.idle and not self.probes:
                raise RuntimeError("ray annotate: no worker left to run the remaining shards")
            while self.queue and self.idle:
                shard, actor = self.queue.popleft(), self.idle.popleft()
                ref = actor.run.remote(shard, str(self.out / Path(shard).name), self.cfg.batch_size)
                self.pending[ref] = (shard, actor)
            done, _ = self.ray.wait(list(self.pending) + list(self.probes), num_returns=1)
            for ref in done:
                if ref in self.probes:
                    self._probe_answered(ref)
                elif self._result(ref):
                    bar.update(1)
                    bar.set_postfix(img_s=f"{self.images / max(time.perf_counter() - t0, 1e-9):.1f}")

    def _probe_answered(self, ref: Any) -> None:
        """A crashed actor answered (restarted: idle again) or is gone for good (replaced)."""
        actor = self.probes.pop(ref)
        try:
            self.ray.get(ref)
        except Exception as exc:
            self.replaced += 1
            if self.replaced > self.cfg.max_retries * self.n:
                raise RuntimeError(f"ray annotate: {self.replaced} workers failed to come back; last: {exc}") from exc
            actor = self.worker_cls.remote(self.spec)
            self.actors.append(actor)
            self.probes[actor.pid.remote()] = actor
            return
        self.idle.append(actor)

    def _result(self, ref: Any) -> bool:
        """Commit a finished shard (True), or requeue it when its worker died (False)."""
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        shard, actor = self.pending.pop(ref)
        try:
            counts = self.ray.get(ref)
        except (RayActorError, WorkerCrashedError) as exc:
            tries = self.attempts[shard] = self.attempts.get(shard, 0) + 1
            if tries > self.cfg.max_retries:
                raise RuntimeError(f"shard {shard}: worker died {tries} times; giving up "
                                   f"(last: {type(exc).__name__})") from exc
            log.warning("shard %s: worker died (%s); retry %d/%d", shard, type(exc).__name__, tries,
                        self.cfg.max_retries)
            self.queue.appendleft(shard)  # the other workers take it up meanwhile
            self.probes[actor.pid.remote()] = actor
            return False
        except RayTaskError as exc:
            raise RuntimeError(f"shard {shard}: annotation failed: {exc}") from exc
        counts.pop("worker_pid", None)
        self.manifest["shards"][Path(shard).name] = counts
        save_manifest(self.out, self.manifest)  # the commit point
        self.images += counts["read"]
        self.idle.append(actor)
        return True


def annotate_shards_ray(spec: AnnotatorSpec, input_glob: str | Sequence[str], out: str | os.PathLike,
                        cfg: RayAnnotateConfig | None = None) -> dict[str, Any]:
    """Annotate every input shard not yet committed in ``out`` with a Ray actor pool; returns the manifest.

    ``manifest["last_run"]`` records the engine, workers, Ray start-up seconds, processing seconds and
    images/s of this call.
    """
    import ray

    cfg = cfg or RayAnnotateConfig()
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = expand_urls(input_glob)
    clean_stale_temps(out)
    manifest = load_manifest(out)
    todo = pending_shards(shards, out, manifest)
    if not todo:
        return finalize_manifest(out, manifest, shards, engine="ray", shards_done=0, images=0, seconds=0.0)

    # Build the annotator here once first: a missing binary, classifier folder or bad option is then a
    # plain error before any Ray start-up, not an actor crash loop.
    t_check = time.perf_counter()
    spec.build()
    check = time.perf_counter() - t_check
    started, startup = start_ray(cfg)
    worker_cls = ray.remote(num_cpus=1, max_restarts=cfg.max_retries, max_task_retries=0)(AnnotateWorker)
    t_actors = time.perf_counter()
    n = min(cfg.num_workers, len(todo))
    actors = [worker_cls.remote(spec) for _ in range(n)]
    ray.get([a.pid.remote() for a in actors])  # every actor has loaded its detector
    warmup = time.perf_counter() - t_actors
    t0 = time.perf_counter()
    sched = _ShardScheduler(ray, worker_cls, spec, actors, todo, out, cfg, manifest)
    bar = tqdm(total=len(todo), desc=f"annotate (ray x{n})", unit="shard", disable=not cfg.progress)
    try:
        sched.run(bar, t0)
    finally:
        bar.close()
        for a in sched.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    images = sched.images
    clean_stale_temps(out)
    manifest = finalize_manifest(
        out, manifest, shards, engine="ray", workers=n, address=cfg.address or "local",
        startup_seconds=round(startup, 3), actor_warmup_seconds=round(warmup, 3),
        driver_check_seconds=round(check, 3), shards_done=len(todo), images=images, seconds=round(seconds, 3),
        images_per_s=round(images / seconds, 2) if seconds > 0 else None, retries=sum(sched.attempts.values()))
    if cfg.progress:
        print(throughput_line(images, seconds, f"ray x{n}") +
              f"; fixed costs: Ray start-up {startup:.1f} s, actors loading the detector {warmup:.1f} s")
    return manifest
