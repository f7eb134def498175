"""Build the Implicit Concept Dataset (ICD) as deterministic webdataset shards.

Every sample is a procedural scene (:mod:`geomerase.data.scenes`) with a clean
caption; a fraction ``ratio`` of the samples also carries the implicit concept
(:mod:`geomerase.data.concepts`) in the pixels only, together with the boxes
that Geom-Erasing uses as its geometric prior.

Determinism: sample ``idx`` of seed ``seed`` draws everything from
``np.random.default_rng([seed, idx])``, and whether it carries the concept is
decided per block of :data:`BLOCK` indices (see :func:`has_concept`), so a
sample's bytes do not depend on ``n``, on ``start_index`` or on how the build
was split.  The scene and caption of an index are also the same for every
concept and ratio: datasets built with one seed are paired (clean vs.
overlaid), so use different seeds when mixing concepts in one training set.

Several concepts in one image: ``concept="qr+watermark+text"`` (a *mixed* ICD). Each member
concept is assigned independently, at ``ratio`` each, by :func:`has_concept` under its own salted
seed, so some images carry two or three concepts and some none. Overlays are drawn in
:data:`MIXED_ORDER` (large, faint ones first, the QR code last so it stays decodable); the
sample's json has ``boxes_by_concept`` (every member, possibly empty) and ``boxes``, their union.

Layout: ``out/icd-<concept>-000000.tar`` ... with ``shard_size`` samples each,
shard number ``index // shard_size``; plus ``out/icd-<concept>-meta.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from geomerase.data.concepts import CONCEPT_NAMES, CONCEPTS, SIZE_PROFILES, overlay
from geomerase.data.scenes import caption, render_scene, sample_scene, scene_attributes
from geomerase.data.shards import atomic_write, encode_png, write_shard

__all__ = ["BLOCK", "MIXED_ORDER", "concept_members", "has_concept", "make_sample", "sample_key", "shard_path",
           "build_icd", "preview_grid", "main"]

MIXED_ORDER = ("watermark", "text", "qr")
"""Drawing order of a mixed sample's overlays."""

# Concept assignment is exact within each block of this many indices, so any
# block-aligned prefix of the dataset has round-to-one-sample the requested
# ratio, while positions inside a block are shuffled.
BLOCK = 100


@functools.lru_cache(maxsize=4096)
def _block_members(seed: int, block: int, ratio: float) -> frozenset[int]:
    # Cumulative rounding: block b gets floor((b+1)*B*r) - floor(b*B*r) members,
    # so over k blocks the total is floor(k*B*r), never drifting.
    count = math.floor((block + 1) * BLOCK * ratio + 1e-9) - math.floor(block * BLOCK * ratio + 1e-9)
    perm = np.random.default_rng([seed, block, 0x1CD]).permutation(BLOCK)
    return frozenset(int(p) for p in perm[:count])


def has_concept(seed: int, idx: int, ratio: float) -> bool:
    """Whether sample ``idx`` carries the concept (exact ratio per block of 100)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    block, pos = divmod(idx, BLOCK)
    return pos in _block_members(seed, block, float(ratio))


def concept_members(concept: str) -> list[str]:
    """``"qr+text"`` -> ``["qr", "text"]``; a single concept -> ``[concept]``. Unknown or repeated
    members are a ValueError."""
    members = concept.split("+")
    bad = [m for m in members if m not in CONCEPTS]
    if bad or len(set(members)) != len(members):
        raise ValueError(f"unknown concept {concept!r}: choose from {sorted(CONCEPTS)}, or several of them "
                         "joined by '+', each once")
    return members


def mixed_carries(concept: str, seed: int, idx: int, ratio: float) -> dict[str, bool]:
    """Which members of a mixed ``concept`` sample ``idx`` carries: each at ``ratio``, independently
    (member ``k`` decided by :func:`has_concept` under seed ``seed + 7919 * (k + 1)``)."""
    return {c: has_concept(seed + 7919 * (k + 1), idx, ratio) for k, c in enumerate(concept_members(concept))}


def sample_key(concept: str, seed: int, idx: int) -> str:
    """The webdataset key of a sample (no dots, sortable by index)."""
    return f"{concept.replace('+', '')}{seed:04d}_{idx:07d}"


def shard_path(out: str | os.PathLike, concept: str, shard_no: int) -> Path:
    return Path(out) / f"icd-{concept}-{shard_no:06d}.tar"


def make_sample(concept: str, seed: int, idx: int, size: int,
                carry: bool | dict[str, bool], sizes: str = "default") -> tuple[Image.Image, str, dict[str, Any]]:
    """Render one sample: ``(image, clean caption, json meta)``.

    ``carry`` overlays the concept; the scene and caption are identical either way. For a mixed
    ``concept`` it maps each member to whether it is drawn (:func:`mixed_carries`).
    ``sizes`` names the overlay size profile (:data:`~geomerase.data.concepts.SIZE_PROFILES`);
    a non-default profile is recorded in the meta as ``"sizes"`` (the default adds
    nothing, so default datasets keep their exact bytes).
    """
    members = concept_members(concept)
    mixed = len(members) > 1
    drawn = carry if isinstance(carry, dict) else {c: bool(carry) for c in members}
    if set(drawn) != set(members):
        raise ValueError(f"carry {drawn} does not name the members of {concept!r}")
    rng = np.random.default_rng([seed, idx])
    scene = sample_scene(rng)
    text = caption(scene, rng)
    img = render_scene(scene, size)
    by_concept: dict[str, list[list[int]]] = {}
    for c in (sorted(members, key=MIXED_ORDER.index) if mixed else members):
        by_concept[c] = []
        if drawn[c]:
            img, by_concept[c] = _overlay_some(c, img, rng, sizes, seed, idx)
    boxes = [b for c in members for b in by_concept[c]]
    meta = {
        "concept": concept,
        "boxes": boxes,
        "attributes": scene_attributes(scene),
        "index": int(idx),
        "seed": int(seed),
    }
    if mixed:
        meta["boxes_by_concept"] = {c: by_concept[c] for c in members}
    if sizes != "default":
        meta["sizes"] = sizes
    return img, text, meta


def _overlay_some(concept: str, img: Image.Image, rng: np.random.Generator, sizes: str, seed: int,
                  idx: int) -> tuple[Image.Image, list[list[int]]]:
    """Overlay ``concept``; a box list that ended up empty would silently turn a concept sample into
    a clean one, so retry, then fail."""
    for _ in range(5):
        out, boxes = overlay(concept, img, rng, sizes)
        if boxes:
            return out, [[int(v) for v in b] for b in boxes]
    raise RuntimeError(f"overlay {concept!r} produced no boxes for seed={seed} idx={idx}")


def _records(concept: str, seed: int, size: int, ratio: float, indices: range,
             bar: tqdm, stats: dict[str, int], sizes: str = "default") -> Iterator[dict[str, Any]]:
    mixed = "+" in concept
    for idx in indices:
        carry: bool | dict[str, bool] = mixed_carries(concept, seed, idx, ratio) if mixed else \
            has_concept(seed, idx, ratio)
        img, text, meta = make_sample(concept, seed, idx, size, carry, sizes)
        stats["n_with_concept"] += int(bool(meta["boxes"]))
        for c, boxes in meta.get("boxes_by_concept", {}).items():
            stats[f"n_with_{c}"] = stats.get(f"n_with_{c}", 0) + int(bool(boxes))
        bar.update(1)
        yield {"__key__": sample_key(concept, seed, idx), "png": encode_png(img), "txt": text,
               "json": meta}


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_icd(concept: str, n: int, ratio: float, size: int, seed: int, out: str | os.PathLike,
              shard_size: int = 1000, start_index: int = 0, progress: bool = True,
              sizes: str = "default") -> dict[str, Any]:
    """Write ``n`` ICD samples (indices ``start_index`` .. ``start_index+n-1``) as tar shards.

    The concept is assigned exactly per block of :data:`BLOCK` indices (not a
    per-sample coin flip), so ``n_with_concept`` equals ``round(ratio*n)``
    up to one sample for block-aligned ranges and stays within one block's
    rounding otherwise.  ``start_index`` must be a multiple of ``shard_size``
    so that split builds write the same shard files as a single build.
    ``sizes`` picks the overlay size profile (``default`` or ``wide``, see
    :data:`~geomerase.data.concepts.SIZE_PROFILES`).
    Returns a summary with ``n``, ``n_with_concept`` and ``shards`` (paths).
    """
    members = concept_members(concept)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n < 0 or size < 8 or shard_size < 1 or seed < 0:
        raise ValueError(f"need n >= 0, size >= 8, shard_size >= 1, seed >= 0 (got {n}, {size}, "
                         f"{shard_size}, {seed})")
    if sizes not in SIZE_PROFILES:
        raise ValueError(f"unknown size profile {sizes!r}; choose from {sorted(SIZE_PROFILES)}")
    if start_index % shard_size:
        raise ValueError(f"start_index ({start_index}) must be a multiple of shard_size ({shard_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"n_with_concept": 0}
    shards: list[str] = []
    stop = start_index + n
    with tqdm(total=n, desc=f"icd-{concept}", unit="img", disable=not progress) as bar:
        for first in range(start_index, stop, shard_size):
            path = shard_path(out, concept, first // shard_size)
            write_shard(path, _records(concept, seed, size, ratio, range(first, min(first + shard_size, stop)),
                                       bar, stats, sizes))
            shards.append(str(path))
    summary = {
        "concept": concept,
        "concept_name": ", ".join(CONCEPT_NAMES[c] for c in members),
        "n": n,
        **stats,
        "ratio": ratio,
        "size": size,
        "seed": seed,
        "start_index": start_index,
        "shard_size": shard_size,
        "shards": shards,
    }
    if sizes != "default":
        summary["sizes"] = sizes
    # With split builds each call rewrites the meta for its own range; the
    # shards themselves are what is reproducible.
    _write_json_atomic(out / f"icd-{concept}-meta.json", {"arguments": {
        "concept": concept, "n": n, "ratio": ratio, "size": size, "seed": seed, "out": str(out),
        "shard_size": shard_size, "start_index": start_index,
        **({"sizes": sizes} if sizes != "default" else {})}, "summary": summary})
    return summary


def preview_grid(concept: str, path: str | os.PathLike, count: int = 16, size: int = 256,
                 seed: int = 0, draw_boxes: bool = False) -> Path:
    """Save a grid of ``count`` concept-carrying samples (for eyeballing the data)."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = Image.new("RGB", (cols * size, rows * size), (128, 128, 128))
    for i in range(count):
        img, _, meta = make_sample(concept, seed, i, size, carry=True)
        if draw_boxes:
            d = ImageDraw.Draw(img)
            for x1, y1, x2, y2 in meta["boxes"]:
                d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(0, 255, 255))
        grid.paste(img, ((i % cols) * size, (i // cols) * size))
    path = Path(path)
    grid.save(path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m geomerase.data.icd --concept qr --n 1000 --out runs/icd`` (``--concept qr+text``: mixed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", required=True,
                    help=f"one of {sorted(CONCEPTS)}, or several joined by '+' (each at --ratio, independently)")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--start-index", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--sizes", choices=sorted(SIZE_PROFILES), default="default",
                    help="overlay size profile; 'wide' reaches below what OpenCV/Tesseract detect")
    a = ap.parse_args(argv)
    concept_members(a.concept)
    summary = build_icd(a.concept, a.n, a.ratio, a.size, a.seed, a.out, a.shard_size,
                        a.start_index, not a.no_progress, a.sizes)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
