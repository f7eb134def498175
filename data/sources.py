"""Where a training run's batches come from: :func:`build_batch_source` picks the configured loader.

* ``memory``: :class:`~geomerase.data.loader.MemorySource`, every image decoded once and held;
* ``webdataset``: :class:`StreamSource` over :class:`~geomerase.data.webdataset_loader.PythonStream`
  (PIL decoding in ``DataLoader`` workers);
* ``dali``: :class:`StreamSource` over :func:`~geomerase.data.dali_loader.dali_batches`.

Every source gives the trainer ``batch(step, part)`` -> :class:`~geomerase.data.loader.LocalBatch`,
and ``state_dict``/``load_state_dict`` for an exact resume.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import torch

from geomerase.data.dali_loader import dali_batches
from geomerase.data.loader import CaptionFn, DataConfig, InMemoryDataset, LocalBatch, MemorySource
from geomerase.data.shards import expand_urls
from geomerase.data.webdataset_loader import PythonStream


def build_batch_source(cfg: DataConfig, resolution: int, grid: int, captions: CaptionFn, seed: int,
                       rank: int = 0, world: int = 1, dataset: InMemoryDataset | None = None):
    """The configured loader: ``memory`` (:class:`MemorySource`), ``webdataset`` or ``dali``."""
    if cfg.loader == "memory":
        ds = dataset or InMemoryDataset(cfg.shards, resolution, cfg.max_samples)
        return MemorySource(ds, grid, captions, cfg.batch_size, seed, cfg.hflip)
    if dataset is not None:
        raise ValueError(f"a prebuilt dataset was passed but data.loader={cfg.loader!r} streams shards")
    if cfg.hflip:
        raise ValueError("data.hflip is only implemented for data.loader=memory")
    return StreamSource(cfg, resolution, grid, captions, seed, rank, world)


class StreamSource:
    """Trainer batch source over a streaming loader (``data.loader=webdataset`` or ``dali``)."""

    streaming = True

    def __init__(self, cfg: DataConfig, resolution: int, grid: int, captions, seed: int, rank: int, world: int):
        self.cfg, self.resolution, self.grid, self.captions = cfg, resolution, grid, captions
        self.seed, self.rank, self.world = seed, rank, world
        self.shards = expand_urls(cfg.shards)
        self.streams = max(cfg.workers, 1)
        if len(self.shards) < world * self.streams:
            raise ValueError(f"data.shards={cfg.shards!r}: {len(self.shards)} shard(s) for {world} process(es) x "
                             f"{self.streams} stream(s); need at least one shard per stream (lower data.workers)")
        self.local_batch = cfg.batch_size // world
        self.next_step = 0
        self._it: Iterator | None = None

    def _open(self, start: int) -> Iterator:
        if self.cfg.loader == "dali":
            return dali_batches(self.shards, self.resolution, self.grid, self.local_batch, self.cfg.shuffle_buffer,
                                self.seed, self.rank, self.world, self.streams, self.cfg.dali_threads, start)
        ds = PythonStream(self.shards, self.resolution, self.grid, self.local_batch, self.cfg.shuffle_buffer,
                          self.seed, self.rank, self.world, self.streams, skip_batches=start)
        if self.cfg.workers == 0:
            return iter(ds)
        # Workers are visited round-robin in order, so process batch k is stream (k mod S)'s; the
        # replay offset makes the resumed first batch come from the right stream.
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.workers,
                                         persistent_workers=False, prefetch_factor=2)
        return _rotate(iter(dl), start % self.streams, self.streams)

    def batch(self, step: int, part: tuple[int, int]) -> LocalBatch:
        """This process's batch of ``step`` (steps must come in order)."""
        if self._it is None or step != self.next_step:
            self._it = self._open(step)
        images, records, masks = next(self._it)
        self.next_step = step + 1
        rng = random.Random(self.seed * 1_000_003 + step * 7_919 + self.rank)
        captions = [self.captions(r.caption, r.concepts, rng) for r in records]
        n = len(records)
        return LocalBatch(images, captions, masks, 0, n, n, None, stream_salt=(self.rank + 1) * 1_000_000_007)

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"loader": self.cfg.loader, "step": step, "rank": self.rank, "world": self.world,
                "streams": self.streams, "local_batch": self.local_batch}

    def load_state_dict(self, step: int, state: dict[str, Any] | None) -> None:
        if state is not None:
            for k in ("world", "streams", "local_batch"):
                if state.get(k) != getattr(self, k):
                    raise ValueError(f"checkpoint's data position was recorded with {k}={state.get(k)}, this run "
                                     f"has {getattr(self, k)}; the stream cannot be resumed exactly")
        self._it = self._open(step)
        self.next_step = step


def _rotate(it: Iterator, offset: int, streams: int) -> Iterator:
    """DataLoader workers are visited 0, 1, ..., S-1; after a replay of k batches the next batch belongs
    to stream k mod S. Buffer the first ``offset`` worker outputs and emit them after the rest of the round."""
    if offset == 0:
        yield from it
        return
    while True:
        held = [next(it) for _ in range(offset)]
        rest = [next(it) for _ in range(streams - offset)]
        yield from rest
        yield from held
