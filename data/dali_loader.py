"""NVIDIA DALI input: the stream of :mod:`geomerase.data.webdataset_loader`, read and decoded by DALI.

Each stream is a DALI pipeline per epoch: ``fn.readers.webdataset`` over the stream's shards
in the epoch's order (no reader shuffling: the order is ours; the image output is the extension
set of :data:`~geomerase.data.shards.IMAGE_EXTS`, so png, jpg, jpeg and webp samples all read),
``fn.decoders.image``
(``device="mixed"``, i.e. nvJPEG/GPU decode, when a GPU is present; CPU otherwise, with
``device_id=None``) and ``fn.resize`` to the training resolution. The decoded samples then go
through the same shuffle buffer and batching as the Python path, so for the same seed both
loaders give the same samples in the same batches; pixel values may differ slightly
(DALI's resampling filter vs PIL's box/bicubic).

Samples whose image DALI cannot decode stop the pipeline with DALI's error (the Python path
skips them); validate shards with ``geomerase.data.shards`` first.
"""
from __future__ import annotations

import json
import logging
from typing import Iterator

import numpy as np
import torch

from geomerase.data.shards import IMAGE_EXTS
from geomerase.data.webdataset_loader import (Decoded, ShuffleBuffer, collate, epoch_order, record_from_meta,
                                              stream_rng, stream_shards)

log = logging.getLogger("geomerase.data")


def _gpu_id() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _pipeline(paths: list[str], resolution: int, batch: int, threads: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    device_id = _gpu_id()

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        encoded, meta = fn.readers.webdataset(paths=paths, ext=[";".join(IMAGE_EXTS), "json"],
                                              missing_component_behavior="skip", random_shuffle=False, name="Reader",
                                              pad_last_batch=False)
        images = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_x=resolution, resize_y=resolution, antialias=True)
        return images, meta

    p = pipe()
    p.build()
    return p


def dali_samples(paths: list[str], resolution: int, threads: int, seed: int, batch: int = 32) -> Iterator[Decoded]:
    """One pass over ``paths`` in order: decoded samples (``(3, R, R)`` uint8 on the CPU)."""
    p = _pipeline(paths, resolution, batch, threads, seed)
    total = p.epoch_size("Reader")
    seen = 0
    while seen < total:
        images, metas = p.run()
        images = images.as_cpu() if hasattr(images, "as_cpu") else images
        for i in range(len(metas)):
            if seen >= total:  # the last batch wraps into the next epoch's first samples
                break
            meta = json.loads(np.asarray(metas[i]).tobytes().decode("utf-8"))
            img = torch.from_numpy(np.asarray(images[i])).permute(2, 0, 1).contiguous()
            yield Decoded(img, record_from_meta(meta.get("key", str(seen)), meta))
            seen += 1
    del p


def dali_stream(paths: list[str], resolution: int, threads: int, seed: int, rank: int, stream: int
                ) -> Iterator[Decoded]:
    """Endless: one permutation of ``paths`` per epoch, as the Python stream."""
    epoch = 0
    while True:
        order = epoch_order(paths, seed, rank, stream, epoch)
        n = 0
        for d in dali_samples(order, resolution, threads, seed):
            n += 1
            yield d
        if n == 0:
            raise ValueError(f"no samples in shards {paths}")
        epoch += 1


def dali_batches(shards: list[str], resolution: int, grid: int, batch: int, buffer: int, seed: int, rank: int,
                 world: int, streams: int, threads: int, start: int = 0
                 ) -> Iterator[tuple[torch.Tensor, list, torch.Tensor]]:
    """Process batches ``start, start+1, ...``: batch k is stream (k mod S)'s batch (k // S)."""
    its = []
    for s in range(streams):
        paths = stream_shards(shards, rank, world, s, streams)
        buf = ShuffleBuffer(buffer, stream_rng(seed, rank, s))
        it = buf(dali_stream(paths, resolution, threads, seed, rank, s))
        done = max(0, -(-(start - s) // streams))
        for _ in range(done * batch):
            next(it)
        its.append(it)
    k = start
    while True:
        it = its[k % streams]
        items = [next(it) for _ in range(batch)]
        yield collate(items, grid)
        k += 1
