"""Streaming loaders for shards too large to hold in memory: webdataset (Python) and DALI.

Both produce the same sample stream, defined here so that they agree batch for batch (up
to decode/resize differences):

* **ranks**: process ``r`` of ``W`` reads shards ``r, r+W, ...`` of the sorted shard list;
* **streams**: a process runs ``S = max(workers, 1)`` parallel streams; stream ``s`` reads
  the process's shards ``s, s+S, ...``, in an order permuted per epoch by
  ``(seed, rank, stream, epoch)``, and loops over epochs forever (so every process always
  has a next batch and ranks stay in lock step);
* **shuffle buffer**: each stream passes its samples through a buffer of
  ``data.shuffle_buffer`` samples (seeded by ``(seed, rank, stream)``) and emits batches of
  ``batch_size / world`` samples; process batch ``k`` is stream ``k mod S``'s batch ``k // S``.

The position is therefore the step: batch ``k`` of a process is fully determined by ``k``,
and resuming at step ``k`` replays each stream's first ``k // S`` batches (decoding them, so a
bad image is skipped exactly as in the interrupted run; the cost is at most one pass over the
data already seen in the current stream, which is cheap next to training on it).
Bad samples are skipped and counted exactly as :mod:`geomerase.data.shards` does.

The Python path decodes with PIL in ``torch.utils.data.DataLoader`` workers (one stream each);
the DALI path (:mod:`geomerase.data.dali_loader`) reads the same shards with
``fn.readers.webdataset`` and decodes with ``fn.decoders.image`` (``mixed`` = GPU decode when
a GPU is present).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from geomerase.data.loader import Record, _annotation, image_to_tensor
from geomerase.data.shards import (IMAGE, SkipCounter, TarDamage, decode_image, image_field,
                                   iter_key_groups, missing_requirement)

log = logging.getLogger("geomerase.data")


@dataclass
class RawSample:
    """One sample's undecoded fields (image, ``json``, ``txt`` bytes), with its shard."""

    key: str
    fields: dict[str, bytes]
    shard: str


def stream_shards(shards: list[str], rank: int, world: int, stream: int, streams: int) -> list[str]:
    """The shards stream ``stream`` of process ``rank`` reads (sorted list split rank-major, then by stream)."""
    mine = shards[rank::world]
    return mine[stream::streams]


def epoch_order(paths: list[str], seed: int, rank: int, stream: int, epoch: int) -> list[str]:
    """``paths`` permuted for ``epoch`` (deterministic in ``(seed, rank, stream, epoch)``)."""
    order = np.random.default_rng([seed, rank, stream, epoch, 17]).permutation(len(paths))
    return [paths[i] for i in order]


def iter_raw(shard: str, skips: SkipCounter, require: tuple[str, ...] = (IMAGE, "json")) -> Iterator[RawSample]:
    """Undecoded samples of one tar shard (``require`` as in :func:`~geomerase.data.shards.iter_samples`);
    a damaged shard yields what precedes the damage."""
    for item in iter_key_groups(shard):
        if isinstance(item, TarDamage):
            skips.skip(shard, item.key or "<start of shard>", "corrupt shard", item.describe())
            return
        key, fields = item
        reason = missing_requirement(fields, require)
        if reason is not None:
            skips.skip(shard, key, reason)
        else:
            yield RawSample(key, fields, shard)


class ShuffleBuffer:
    """Reservoir-style shuffle: fill to ``size``, then emit a random slot and refill it."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.buf = size, rng, []

    def __call__(self, items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            if len(self.buf) < self.size:
                self.buf.append(item)
                continue
            i = self.rng.randrange(self.size)
            out, self.buf[i] = self.buf[i], item
            yield out
        # Never reached for the endless streams used here; drains a finite input.
        while self.buf:
            yield self.buf.pop(self.rng.randrange(len(self.buf)))


def raw_stream(paths: list[str], seed: int, rank: int, stream: int, skips: SkipCounter,
               reader: Callable[[list[str]], Iterator[Any]] | None = None) -> Iterator[Any]:
    """Endless stream over ``paths``, one permutation per epoch. ``reader`` maps an epoch's ordered
    shard list to samples (default: :func:`iter_raw`)."""
    if not paths:
        raise ValueError(f"stream {stream} of rank {rank} has no shards")
    epoch = 0
    while True:
        order = epoch_order(paths, seed, rank, stream, epoch)
        n = 0
        if reader is None:
            for shard in order:
                for s in iter_raw(shard, skips):
                    n += 1
                    yield s
        else:
            for s in reader(order):
                n += 1
                yield s
        if n == 0:
            raise ValueError(f"no usable samples in shards {paths} (skipped: {skips.summary()['by_reason']})")
        epoch += 1


def stream_rng(seed: int, rank: int, stream: int) -> random.Random:
    return random.Random(seed * 1_000_003 + rank * 7_919 + stream * 104_729 + 1)


@dataclass
class Decoded:
    """One decoded sample: ``image`` ``(3, R, R)`` uint8 and its text side."""

    image: torch.Tensor
    record: Record


def decode_raw(s: RawSample, resolution: int, skips: SkipCounter) -> Decoded | None:
    """PIL decode (of the field :func:`~geomerase.data.shards.image_field` picks) + resize; None
    (counted in ``skips``) for a bad image or json."""
    try:
        meta = json.loads(s.fields["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("json is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        skips.skip(s.shard, s.key, "invalid json", str(exc))
        return None
    try:
        img = decode_image(s.fields[image_field(s.fields)])
    except Exception as exc:  # PIL raises many types for bad data
        skips.skip(s.shard, s.key, "bad image", f"{type(exc).__name__}: {exc}")
        return None
    return Decoded(image_to_tensor(img, resolution), record_from_meta(s.key, meta, s.fields.get("txt"), s.shard))


def record_from_meta(key: str, meta: dict, txt: bytes | None = None, shard: str = "") -> Record:
    """The text side of a sample from its json (and ``txt`` when the json has no clean caption)."""
    found, cells, grid = _annotation(meta)
    caption = meta.get("caption_clean") or (txt.decode("utf-8").strip() if txt else meta.get("caption", ""))
    return Record(key, caption, found, cells, grid, shard)


def collate(items: list[Decoded], grid: int) -> tuple[torch.Tensor, list[Record], torch.Tensor]:
    """``(b, 3, R, R)`` uint8 images, records, ``(b, G, G)`` bool concept masks.

    Raises ValueError when a sample was annotated at a grid other than ``grid``."""
    images = torch.stack([d.image for d in items])
    masks = torch.zeros(len(items), grid * grid, dtype=torch.bool)
    for i, d in enumerate(items):
        d.record.check_grid(grid)
        if d.record.cells:
            masks[i, d.record.cells] = True
    return images, [d.record for d in items], masks.view(-1, grid, grid)


class PythonStream(torch.utils.data.IterableDataset):
    """The webdataset path: each DataLoader worker runs one stream and yields whole batches."""

    def __init__(self, shards: list[str], resolution: int, grid: int, batch: int, buffer: int, seed: int,
                 rank: int, world: int, streams: int, skip_batches: int = 0):
        super().__init__()
        self.shards, self.resolution, self.grid, self.batch = shards, resolution, grid, batch
        self.buffer, self.seed, self.rank, self.world, self.streams = buffer, seed, rank, world, streams
        self.skip_batches = skip_batches
        """Process batches already consumed (resume position)."""

    def stream_batches(self, stream: int) -> Iterator[tuple[torch.Tensor, list[Record], torch.Tensor]]:
        skips = SkipCounter()
        paths = stream_shards(self.shards, self.rank, self.world, stream, self.streams)
        buf = ShuffleBuffer(self.buffer, stream_rng(self.seed, self.rank, stream))
        it = buf(raw_stream(paths, self.seed, self.rank, stream, skips))
        # This stream's share of the consumed process batches: k, k+S, ... belong to stream k mod S.
        done = max(0, -(-(self.skip_batches - stream) // self.streams))
        for _ in range(done):  # replay (decoding: a bad image must be skipped exactly as it was)
            self._take(it, skips, collate_batch=False)
        while True:
            yield self._take(it, skips)

    def _take(self, it: Iterator[RawSample], skips: SkipCounter, collate_batch: bool = True):
        items: list[Decoded] = []
        while len(items) < self.batch:
            d = decode_raw(next(it), self.resolution, skips)
            if d is not None:
                items.append(d)
        return collate(items, self.grid) if collate_batch else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            if self.streams != 1:
                raise RuntimeError("PythonStream with several streams must run in DataLoader workers")
            return self.stream_batches(0)
        return self.stream_batches(info.id)
