"""The concept-free pretraining corpus of the base models.

The base models stand in for a pretrained Stable Diffusion: they are trained once, long, on
scenes that never carry an implicit concept, so that a fine-tune on an ICD starts from a model
whose text conditioning already works. Two kinds of samples are mixed:

* ``icd``: the ICD's own scenes and caption templates (:func:`~geomerase.data.scenes.sample_scene`,
  :func:`~geomerase.data.scenes.caption`), so the prompts a fine-tune and its evaluation use are
  in the base model's distribution;
* ``rich``: 1-4 objects of three size classes anywhere in the frame, every object named with its
  size, colour, shape and position (:func:`~geomerase.data.scenes.detailed_caption`). Several
  objects of different colours give the text path a reason to carry *where*: the pooled meaning
  of the caption does not say which object goes where.

Sample ``idx`` of seed ``s`` is a pure function of ``(s, idx)``; ``rich_prob`` of them (exact per
block of 100 indices, as the ICD's concept ratio) are ``rich``. Shards use the ICD's layout
(``png``, ``txt``, ``json`` with ``attributes`` of the first object), so every loader reads them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from geomerase.data.icd import has_concept
from geomerase.data.scenes import caption, detailed_caption, render_scene, sample_rich_scene, sample_scene, \
    scene_attributes
from geomerase.data.shards import atomic_write, encode_png, write_shard

__all__ = ["make_corpus_sample", "build_corpus", "corpus_shard_path"]


def make_corpus_sample(seed: int, idx: int, size: int, rich_prob: float) -> tuple[bytes, str, dict[str, Any]]:
    """``(png bytes, caption, meta)`` of corpus sample ``idx``; ``meta["kind"]`` is ``icd`` or ``rich``."""
    rich = has_concept(seed, idx, rich_prob)
    rng = np.random.default_rng([seed, idx, 0xBA5E])
    scene = sample_rich_scene(rng) if rich else sample_scene(rng)
    text = detailed_caption(scene, rng) if rich else caption(scene, rng)
    meta = {"kind": "rich" if rich else "icd", "boxes": [], "attributes": scene_attributes(scene),
            "n_objects": len(scene.objects), "index": int(idx), "seed": int(seed)}
    return encode_png(render_scene(scene, size)), text, meta


def corpus_shard_path(out: str | os.PathLike, shard_no: int) -> Path:
    return Path(out) / f"corpus-{shard_no:06d}.tar"


def _records(seed: int, size: int, rich_prob: float, indices: range, bar: tqdm) -> Iterator[dict[str, Any]]:
    for idx in indices:
        png, text, meta = make_corpus_sample(seed, idx, size, rich_prob)
        bar.update(1)
        yield {"__key__": f"base{seed:04d}_{idx:07d}", "png": png, "txt": text, "json": meta}


def build_corpus(n: int, size: int, seed: int, out: str | os.PathLike, rich_prob: float = 0.5,
                 shard_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Write ``n`` corpus samples as tar shards under ``out``; a complete shard already there is kept
    (a build interrupted part-way resumes at the first missing shard). Returns a summary."""
    if n < 1 or size < 8 or shard_size < 1 or seed < 0 or not 0.0 <= rich_prob <= 1.0:
        raise ValueError(f"corpus: need n >= 1, size >= 8, shard_size >= 1, seed >= 0, rich_prob in [0, 1] "
                         f"(got {n}, {size}, {shard_size}, {seed}, {rich_prob})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    with tqdm(total=n, desc="base corpus", unit="img", disable=not progress) as bar:
        for first in range(0, n, shard_size):
            path = corpus_shard_path(out, first // shard_size)
            stop = min(first + shard_size, n)
            if not path.is_file():  # write_shard renames into place: a present shard is whole
                write_shard(path, _records(seed, size, rich_prob, range(first, stop), bar))
            else:
                bar.update(stop - first)
            shards.append(str(path))
    summary = {"n": n, "size": size, "seed": seed, "rich_prob": rich_prob, "shard_size": shard_size,
               "shards": shards}
    atomic_write(out / "corpus-meta.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
