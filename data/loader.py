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
from dataclasses import dataclass
from typing import Iterator

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

    def validate(self) -> None:
        if not self.shards:
            raise ValueError("data.shards is empty: give a glob of annotated shards")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Record:
    """One training sample's text side."""

    key: str
    caption: str
    """The clean caption (never mentions the concept)."""
    concept_name: str | None
    """Concept phrase when the annotator found the concept, else None."""
    cells: list[int]
    """Flat grid cells the concept covers (empty when absent)."""


def _annotation(meta: dict) -> tuple[str | None, list[int], int | None]:
    ann = meta.get("annotation")
    if not ann:
        return None, [], None
    cells = [int(c) for c in ann.get("cells", [])]
    return (ann.get("concept_name") if cells else None), cells, ann.get("grid")


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
            concept, cells, g = _annotation(s.meta)
            if g is not None:
                grid = g
            caption = s.meta.get("caption_clean", s.caption)
            images.append(image_to_tensor(s.image, resolution))
            records.append(Record(s.key, caption, concept, cells))
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
        masks = torch.zeros(len(self), grid * grid, dtype=torch.bool)
        for i, r in enumerate(self.records):
            if r.cells:
                masks[i, r.cells] = True
        return masks.view(-1, grid, grid)


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
