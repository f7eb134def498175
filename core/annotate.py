"""Annotation: detect the concept, encode its geometry and rewrite the caption.

:class:`Annotator` turns one sample into its annotated form; :func:`annotate_shards`
runs it over shards in one process, writing output shards one-to-one with the
input shards (same file names). A shard is committed atomically when complete
and skipped on a rerun, and ``_manifest.json`` records per-shard counts, so an
interrupted job resumes without redoing or duplicating work. The Ray engine in
``geomerase.distributed`` reuses the same :class:`Annotator`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from geomerase.core.captions import rewrite_caption
from geomerase.core.detectors import Detector
from geomerase.core.geometry import GeometryConfig
from geomerase.data.shards import Sample, SkipCounter, encode_png, expand_urls, iter_samples, write_shard

log = logging.getLogger("geomerase.annotate")


@dataclass
class AnnotateConfig:
    input: str = ""
    """Glob of input shards."""
    out: str = ""
    """Output folder (one shard per input shard, same name)."""
    detector: str = "patch-classifier"
    """Detector registry name."""
    concept: str = "qr"
    """Concept key: qr, watermark or text."""
    concept_name: str | None = None
    """Phrase used in captions; None: the ICD's name for the concept."""
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    """Grid and cell-coverage rule."""
    batch_size: int = 64
    """Images per detector call."""


class Annotator:
    """Detect -> cells -> rewritten caption, for one batch of samples."""

    def __init__(self, detector: Detector, geometry: GeometryConfig, tokenizer, concept_name: str):
        self.detector = detector
        self.encoder = geometry.build()
        self.geometry = geometry
        self.tokenizer = tokenizer
        self.concept_name = concept_name

    def annotate(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """Output records (``__key__``, ``png``, ``txt``, ``json``) for ``samples``."""
        dets = self.detector.detect_batch([s.image for s in samples], [s.meta for s in samples])
        out = []
        for s, found in zip(samples, dets):
            w, h = s.image.size
            cells = self.encoder.cells_from_boxes([d.box for d in found], w, h)
            clean = s.meta.get("caption_clean", s.caption)
            rw = rewrite_caption(clean, self.concept_name, cells, self.tokenizer)
            if rw.truncated:
                log.warning("sample %s in %s: caption too long for 77 tokens; dropped words %s, cells %s",
                            s.key, s.shard, rw.dropped_words, rw.dropped_cells)
            meta = dict(s.meta)
            meta["caption_clean"] = clean
            meta["annotation"] = {
                "detector": self.detector.name, "concept": self.detector.concept, "concept_name": self.concept_name,
                "grid": self.geometry.grid, "mode": self.geometry.mode,
                "overlap_threshold": self.geometry.overlap_threshold,
                "detections": [d.to_json() for d in found], "cells": cells,
                "tokens": [f"<l{c}>" for c in cells],
                "dropped_words": rw.dropped_words, "dropped_cells": rw.dropped_cells,
            }
            out.append({"__key__": s.key, "png": encode_png(s.image),
                        "txt": rw.text, "json": meta})
        return out


def _load_manifest(out: Path) -> dict[str, Any]:
    path = out / "_manifest.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"shards": {}}


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "._manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / "_manifest.json")


def annotate_shard(annotator: Annotator, shard: str, out_path: Path, batch_size: int) -> dict[str, Any]:
    """Annotate one shard into ``out_path`` (atomic); returns its counts."""
    skips = SkipCounter()
    records: list[dict[str, Any]] = []
    batch: list[Sample] = []
    n_read = 0
    for s in iter_samples([shard], skips):
        n_read += 1
        batch.append(s)
        if len(batch) >= batch_size:
            records += annotator.annotate(batch)
            batch = []
    if batch:
        records += annotator.annotate(batch)
    write_shard(out_path, records)
    return {
        "read": n_read + skips.total, "annotated": len(records),
        "with_concept": sum(bool(r["json"]["annotation"]["cells"]) for r in records),
        "skipped": dict(skips.counts),
        "skipped_samples": [{"key": k, "reason": r} for _, k, r in skips.records],
    }


def annotate_shards(annotator: Annotator, input_glob: str, out: str | os.PathLike, batch_size: int = 64,
                    progress: bool = True) -> dict[str, Any]:
    """Annotate every input shard not yet committed in ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = expand_urls(input_glob)
    manifest = _load_manifest(out)
    for shard in tqdm(shards, desc="annotate", unit="shard", disable=not progress):
        name = Path(shard).name
        target = out / name
        if name in manifest["shards"] and target.is_file():
            continue  # committed by an earlier run
        manifest["shards"][name] = annotate_shard(annotator, shard, target, batch_size)
        _save_manifest(out, manifest)
    totals: dict[str, Any] = {"read": 0, "annotated": 0, "with_concept": 0, "skipped": 0}
    for counts in manifest["shards"].values():
        for k in ("read", "annotated", "with_concept"):
            totals[k] += counts[k]
        totals["skipped"] += sum(counts["skipped"].values())
    manifest["totals"] = totals
    _save_manifest(out, manifest)
    return manifest
