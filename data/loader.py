"""In-memory training set for the single-process loop: annotated shards -> tensors.

Small datasets (the embedded default's ICD) fit in memory at the model's
resolution, which makes every batch a pure function of ``(seed, step)``: a resumed
run draws exactly the batches the interrupted one would have, with no loader
state to save. Streaming loaders for large data (webdataset, DALI) live beside
this module.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from geomerase.data.shards import SkipCounter, iter_samples

log = logging.getLogger("geomerase.data")


@dataclass
class DataConfig:
    shards: str = ""
    """Glob or brace pattern of annotated (or raw ICD) webdataset shards."""
    resolution: int | None = None
    """Training resolution in pixels; None: the model's resolution."""
    batch_size: int = 32
    """Images per optimizer step."""
    max_samples: int | None = None
    """Use at most this many samples (the first ones, in shard order); None: all."""
    hflip: bool = False
    """Random horizontal flips (off by default: they would move the concept to other cells)."""
    loader: Literal["memory", "webdataset", "dali"] = "memory"
    """memory: decode every sample once, batches a pure function of (seed, step) (the reference);
    webdataset: stream shards (split across ranks and workers) through a shuffle buffer;
    dali: the same stream decoded by NVIDIA DALI (GPU decode when a GPU is present)."""
    shuffle_buffer: int = 1000
    """Streaming loaders: samples held in the shuffle buffer of each stream."""
    workers: int = 2
    """Streaming loaders: parallel streams per process (DataLoader workers / DALI pipelines); each
    reads its own subset of the process's shards. 0 = one stream in the main process."""
    dali_threads: int = 2
    """DALI: CPU threads per pipeline."""
    precompute_latents: bool = False
    """Latent models, memory loader: encode every image with the frozen VAE once (mean and std are
    kept; each step samples its latents from ``(seed, step)``)."""

    def validate(self) -> None:
        if not self.shards:
            raise ValueError("data.shards is empty: give a glob of annotated shards")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")


@dataclass
class Record:
    """One training sample's text side."""

    key: str
    caption: str
    """The clean caption (never mentions the concept)."""
    concepts: list[tuple[str, list[int | tuple[int, int]]]]
    """``(concept name, caption units)`` of each concept the annotator found (several: in the order
    of their concept keys, as the json stores them), empty when none was found. A unit is a cell,
    or a corner pair when the annotation's mode is ``corner``."""
    cells: list[int]
    """Flat grid cells any found concept covers (their union; the region re-weighting mask)."""
    grid: int | None = None
    """The grid the annotation's cells index (None when the sample is not annotated)."""
    shard: str = ""
    """The shard the sample came from (for error messages; empty when unknown)."""

    def check_grid(self, grid: int) -> None:
        """Raise ValueError when the cells were annotated at another grid or fall outside ``grid``."""
        where = f"{self.shard or '<unknown shard>'} sample {self.key!r}"
        if self.grid is not None and self.grid != grid:
            raise ValueError(f"{where}: annotated at grid {self.grid}, but the model's grid is {grid}; "
                             f"re-annotate the shards at grid {grid} or train at grid {self.grid}")
        named = self.cells + [c for _, us in self.concepts for u in us for c in (u if isinstance(u, tuple) else (u,))]
        bad = sorted({c for c in named if not 0 <= c < grid * grid})
        if bad:
            raise ValueError(f"{where}: annotation cells {bad} lie outside a {grid}x{grid} grid")


def _annotation(meta: dict) -> tuple[list[tuple[str, list[int | tuple[int, int]]]], list[int], int | None]:
    """``(concepts found with their caption units, union of their covered cells, grid)`` of a
    sample's ``annotation`` (one detector: ``concept_name`` and ``cells``; several: ``concepts:
    {concept: {concept_name, cells}}``). In corner mode a concept's units are its ``corners``
    pairs; the covered ``cells`` stay the region either way."""
    ann = meta.get("annotation")
    if not ann:
        return [], [], None
    grid = ann.get("grid")
    corner = ann.get("mode") == "corner"

    def units(entry: dict) -> list[int | tuple[int, int]]:
        if corner:
            return [(int(a), int(b)) for a, b in entry.get("corners", [])]
        return [int(c) for c in entry.get("cells", [])]

    if "concepts" in ann:
        found = [(str(v["concept_name"]), units(v)) for v in ann["concepts"].values()]
    else:
        found = [(str(ann["concept_name"]), units(ann))] if "concept_name" in ann else []
    found = [(name, us) for name, us in found if us]
    # ``cells`` is the union over the concepts (the annotator writes it for one detector and several)
    return found, [int(c) for c in ann.get("cells", [])], (None if grid is None else int(grid))


def annotated_cells(shards: str, grid: int | None = None) -> list[list[int]]:
    """The annotated cells of every sample of ``shards`` that carries the concept.

    With ``grid``, a sample annotated at another grid is a ValueError naming it."""
    out = []
    for s in iter_samples(shards):
        found, cells, g = _annotation(s.meta)
        if grid is not None:
            Record(s.key, "", found, cells, g, s.shard).check_grid(grid)
        if cells:
            out.append(cells)
    return out


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """PIL RGB -> ``(3, R, R)`` uint8, area-resized (antialiased) to ``resolution``."""
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BOX if img.size[0] % resolution == 0 else Image.BICUBIC)
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class InMemoryDataset:
    """All samples of some shards, decoded once.

    ``images``: ``(N, 3, R, R)`` uint8. ``records``: captions and annotations.
    ``cell_masks``: ``(N, G, G)`` bool (when shards are annotated). ``metas``: each sample's
    json, and ``sizes``: each source image's ``(width, height)`` before resizing (boxes are in
    those pixels).
    """

    def __init__(self, shards: str, resolution: int, max_samples: int | None = None,
                 skips: SkipCounter | None = None):
        self.skips = skips if skips is not None else SkipCounter()
        images, records, metas, sizes = [], [], [], []
        grid = None
        for s in iter_samples(shards, self.skips):
            found, cells, g = _annotation(s.meta)
            if g is not None:
                grid = g
            caption = s.meta.get("caption_clean", s.caption)
            images.append(image_to_tensor(s.image, resolution))
            records.append(Record(s.key, caption, found, cells, g, s.shard))
            metas.append(s.meta)
            sizes.append(s.image.size)
            if max_samples is not None and len(records) >= max_samples:
                break
        if not records:
            raise ValueError(f"no usable samples in {shards!r} (skipped: {self.skips.summary()})")
        self.images = torch.stack(images)
        self.records = records
        self.metas = metas
        self.sizes = sizes
        self.grid = grid
        if self.skips.total:
            log.warning("loaded %d samples from %s; skipped %d: %s", len(records), shards, self.skips.total,
                        dict(self.skips.counts))

    def __len__(self) -> int:
        return len(self.records)

    def cell_masks(self, grid: int) -> torch.Tensor:
        """``(N, G, G)`` bool concept masks; ValueError when a sample was annotated at another grid."""
        masks = torch.zeros(len(self), grid * grid, dtype=torch.bool)
        for i, r in enumerate(self.records):
            r.check_grid(grid)
            if r.cells:
                masks[i, r.cells] = True
        return masks.view(len(self), grid, grid)


class StepBatches:
    """Deterministic batches: batch ``step`` depends only on ``(seed, step)``.

    Each epoch is a fresh permutation from ``(seed, epoch)``; batch ``step`` takes
    the slice at ``step * batch_size`` of the concatenated permutations.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            perm = self._perm(epoch)
            out.extend(perm[offset: offset + self.batch_size - len(out)].tolist())
        return np.asarray(out)

    def rng(self, step: int) -> random.Random:
        """A Python RNG for the step's caption choices."""
        return random.Random(self.seed * 1_000_003 + step)

    def __iter__(self) -> Iterator[np.ndarray]:
        step = 0
        while True:
            yield self.indices(step)
            step += 1


# --------------------------------------------------------------------------- batch sources


@dataclass
class LocalBatch:
    """The rows of a step's batch that one process / micro-batch works on.

    ``images``: ``(b, 3, R, R)`` uint8; ``masks``: ``(b, G, G)`` bool; ``captions``: b strings.
    Rows ``[lo, hi)`` of a batch of ``total`` rows: noise and timesteps are drawn for all
    ``total`` rows from the step's seed and sliced, so any split sees the same draws.
    """

    images: torch.Tensor
    captions: list[str]
    masks: torch.Tensor
    lo: int
    hi: int
    total: int
    indices: np.ndarray | None = None
    """Dataset rows (memory loader), for precomputed latents."""
    stream_salt: int = 0
    """Added to the noise seed: 0 for the global in-memory batch, distinct per rank for streams."""

    def slice(self, k: int, n: int) -> "LocalBatch":
        """The k-th of n equal row slices (relative to this batch)."""
        b = self.hi - self.lo
        if b % n:
            raise ValueError(f"cannot split a batch of {b} rows into {n} equal micro-batches")
        per = b // n
        s = slice(k * per, (k + 1) * per)
        return LocalBatch(self.images[s], self.captions[s], self.masks[s], self.lo + k * per,
                          self.lo + (k + 1) * per, self.total,
                          None if self.indices is None else self.indices[s], self.stream_salt)


CaptionFn = Callable[[str, list, random.Random], str]
"""``(clean caption, [(concept name, cells), ...], rng) -> training caption`` (a ``CaptionBuilder``)."""


def mirror_cells(cells: Sequence[int], grid: int) -> list[int]:
    """The flat cells of a horizontally flipped image: ``(r, c) -> (r, G-1-c)``."""
    return [(c // grid) * grid + grid - 1 - c % grid for c in cells]


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def mirror_caption(caption: str) -> str:
    """The caption of a horizontally flipped image: "left" and "right" swapped."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


class MemorySource:
    """Batches of an :class:`InMemoryDataset`: the global batch of ``step`` is a pure function of
    ``(seed, step)``; ``batch(step, (k, n))`` returns its k-th of n row slices."""

    streaming = False

    def __init__(self, dataset: InMemoryDataset, grid: int, captions: CaptionFn, batch_size: int, seed: int,
                 hflip: bool = False):
        self.dataset = dataset
        self.masks = dataset.cell_masks(grid)
        self.captions = captions
        self.grid = grid
        self.hflip = hflip
        self.batches = StepBatches(len(dataset), batch_size, seed)

    def batch(self, step: int, part: tuple[int, int] = (0, 1)) -> LocalBatch:
        idx = self.batches.indices(step)
        rng = self.batches.rng(step)
        # The caption RNG runs over the whole global batch in order, so every split agrees.
        flips = [rng.random() < 0.5 for _ in idx] if self.hflip else [False] * len(idx)
        captions = []
        for i, f in zip(idx, flips):
            r = self.dataset.records[i]
            concepts = [(name, mirror_cells(cells, self.grid)) for name, cells in r.concepts] if f else r.concepts
            captions.append(self.captions(mirror_caption(r.caption) if f else r.caption, concepts, rng))
        k, n = part
        per = len(idx) // n
        lo, hi = k * per, (k + 1) * per
        rows = idx[lo:hi]
        images, masks = self.dataset.images[rows], self.masks[rows]
        if self.hflip:
            flip = torch.tensor(flips[lo:hi])
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
        return LocalBatch(images, captions[lo:hi], masks, lo, hi, len(idx), rows)

    def state_dict(self, step: int) -> dict[str, Any]:
        """Position: nothing beyond the step (batches are a function of it)."""
        return {"loader": "memory", "step": step}

    def load_state_dict(self, step: int, state: dict[str, Any] | None) -> None:
        pass
