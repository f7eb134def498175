"""Annotation: detect the concept(s), encode their geometry and rewrite the caption.

:class:`Annotator` turns samples into their annotated form; :func:`annotate_shards`
runs it over shards in one process, writing output shards one-to-one with the
input shards (same file names). A shard is committed atomically when complete
(temp file, then rename, then ``_manifest.json``) and skipped on a rerun, so an
interrupted job resumes without redoing or duplicating work. The Ray engine in
:mod:`geomerase.distributed.ray_annotate` runs the same :func:`annotate_shard`
in its workers, so both engines write identical bytes.

Exactly once: every sample key of an input shard ends up either in the output
shard or in the manifest's ``skipped_samples`` with its reason ("bad image",
"missing image", "missing field 'txt'", "empty caption", "non-contiguous key",
"detector error", "corrupt shard", ...), never both and never twice.

Inputs are any shards with an image (png, jpg, jpeg or webp: img2dataset's output as it is),
a caption and a json object. The json needs no ICD field: it is copied into the output and
extended with ``caption_clean`` and ``annotation``. Of the built-in detectors only the oracle
reads ground truth (``boxes``); a sample without it is skipped as "detector error" under the
oracle, never taken for a sample without the concept. The output image is the input's bytes
under the input's field name.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from geomerase.core.captions import rewrite_concepts
from geomerase.core.detectors import Detection, Detector, MultiDetector
from geomerase.core.geometry import GeometryConfig, loc_token, unit_cells
from geomerase.data.shards import (IMAGE, TAR_ERRORS, Sample, SkipCounter, TarDamage, _build_sample, atomic_write,
                                   encode_png, expand_urls, iter_key_groups, split_member_name, write_shard)

log = logging.getLogger("geomerase.annotate")

MANIFEST = "_manifest.json"


class Annotator:
    """Detect -> cells -> rewritten caption, for one batch of samples.

    With a :class:`MultiDetector` every concept is recorded separately in the json
    (``annotation["concepts"][key]``) and the caption gets one phrase per concept found,
    in the detectors' order: ``"<caption>, qr code <l3>, text <l12> <l13>"``.
    """

    def __init__(self, detector: Detector, geometry: GeometryConfig, tokenizer,
                 concept_name: str | Mapping[str, str]):
        self.detector = detector
        self.encoder = geometry.build()
        self.geometry = geometry
        self.tokenizer = tokenizer
        self.multi = isinstance(detector, MultiDetector)
        if self.multi:
            from geomerase.data.concepts import CONCEPT_NAMES

            names = concept_name if isinstance(concept_name, Mapping) else {}
            self.concept_names = {c: names.get(c, CONCEPT_NAMES.get(c, c)) for c in detector.concepts}
        else:
            self.concept_name = concept_name if isinstance(concept_name, str) else concept_name[detector.concept]

    def _detect(self, samples: Sequence[Sample], skips: SkipCounter) -> list[list[Detection] | None]:
        """Detections per sample; a sample whose detection raises is skipped ("detector error")."""
        images, metas = [s.image for s in samples], [s.meta for s in samples]
        try:
            return list(self.detector.detect_batch(images, metas))
        except Exception:  # find the culprit(s) one by one, keep the rest
            out: list[list[Detection] | None] = []
            for s in samples:
                try:
                    out.append(self.detector.detect(s.image, s.meta))
                except Exception as exc:
                    skips.skip(s.shard, s.key, "detector error", f"{type(exc).__name__}: {exc}")
                    out.append(None)
            return out

    def annotate(self, samples: Sequence[Sample], skips: SkipCounter | None = None) -> list[dict[str, Any]]:
        """Output records (``__key__``, image, ``txt``, ``json``) for ``samples`` (skipped ones left out).

        The image keeps the input's field and bytes unchanged (a ``jpg`` stays the same ``jpg``); a
        sample built in memory, without source bytes, is written as ``png``."""
        skips = skips if skips is not None else SkipCounter()
        out = []
        for s, found in zip(samples, self._detect(samples, skips)):
            if found is None:
                continue
            out.append(self._record(s, found))
        return out

    def _place(self, found: list[Detection], w: int, h: int) -> dict[str, Any]:
        """Where ``found`` is: ``cells`` (covered: the region), ``units`` (the caption's location
        units), ``tokens`` (their tokens) and, in corner mode, ``corners`` (the pairs)."""
        boxes = [d.box for d in found]
        units = self.encoder.caption_units(boxes, w, h)
        place = {"cells": self.encoder.cells_from_boxes(boxes, w, h), "units": units,
                 "tokens": [loc_token(c) for c in unit_cells(units)]}
        if self.geometry.mode == "corner":
            place["corners"] = [list(p) for p in units]
        return place

    def _record(self, s: Sample, found: list[Detection]) -> dict[str, Any]:
        w, h = s.image.size
        clean = s.meta.get("caption_clean", s.caption)
        meta = dict(s.meta)
        meta["caption_clean"] = clean
        if not self.multi:
            place = self._place(found, w, h)
            units = place.pop("units")
            rw = rewrite_concepts(clean, [(self.concept_name, units)] if units else [], self.tokenizer)
            meta["annotation"] = {
                "detector": self.detector.name, "concept": self.detector.concept, "concept_name": self.concept_name,
                "grid": self.geometry.grid, "mode": self.geometry.mode,
                "overlap_threshold": self.geometry.overlap_threshold,
                "detections": [d.to_json() for d in found], **place,
                "dropped_words": rw.dropped_words, "dropped_cells": rw.dropped_cells,
            }
        else:
            per: dict[str, Any] = {}
            units = []
            for det in self.detector.detectors:
                mine = [d for d in found if d.concept == det.concept]
                place = self._place(mine, w, h)
                if place["units"]:
                    units.append((self.concept_names[det.concept], place["units"]))
                del place["units"]
                per[det.concept] = {"detector": det.name, "concept_name": self.concept_names[det.concept],
                                    "detections": [d.to_json() for d in mine], **place}
            union = sorted({c for p in per.values() for c in p["cells"]})
            rw = rewrite_concepts(clean, units, self.tokenizer)
            meta["annotation"] = {
                "detector": self.detector.name, "concept": self.detector.concept, "concepts": per,
                "grid": self.geometry.grid, "mode": self.geometry.mode,
                "overlap_threshold": self.geometry.overlap_threshold,
                "cells": union, "tokens": [loc_token(c) for c in union],
                "dropped_words": rw.dropped_words, "dropped_cells": rw.dropped_cells,
            }
        if rw.truncated:
            log.warning("sample %s in %s: caption too long for 77 tokens; dropped words %s, cells %s",
                        s.key, s.shard, rw.dropped_words, rw.dropped_cells)
        image = {s.image_ext: s.image_bytes} if s.image_bytes else {"png": encode_png(s.image)}
        return {"__key__": s.key, **image, "txt": rw.text, "json": meta}


# ------------------------------------------------------------------ reading, exactly once

def scan_keys(shard: str) -> tuple[list[str], set[str]]:
    """Member keys of ``shard`` in order of first appearance, and the keys whose members are
    not adjacent (a key that reappears after another key). Reads headers only; stops quietly at
    damage (the decoding pass reports it)."""
    order: list[str] = []
    seen: set[str] = set()
    split: set[str] = set()
    last = None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext or key == last:
                    continue
                if key in seen:
                    split.add(key)
                else:
                    seen.add(key)
                    order.append(key)
                last = key
    except TAR_ERRORS:
        pass
    return order, split


def iter_shard_once(shard: str, skips: SkipCounter, require: tuple[str, ...] = (IMAGE, "txt", "json")
                    ) -> Iterator[Sample]:
    """Decoded samples of one shard; each key yielded at most once, every other key recorded in
    ``skips`` exactly once with its reason (including "non-contiguous key" and "empty caption")."""
    if not os.path.exists(shard):
        skips.skip(shard, "<all>", "missing shard", "file not found")
        return
    _, split = scan_keys(shard)
    reported: set[str] = set()

    def finish(k: str, f: dict[str, bytes]) -> Sample | None:
        if k in split:
            if k not in reported:
                reported.add(k)
                skips.skip(shard, k, "non-contiguous key", "its members are not adjacent in the tar")
            return None
        s = _build_sample(k, f, shard, require, skips)
        if s is not None and not (s.caption or s.meta.get("caption_clean")):
            skips.skip(shard, k, "empty caption", "field 'txt' is empty")
            return None
        return s

    for item in iter_key_groups(shard):
        if isinstance(item, TarDamage):
            where = item.key if item.key is not None else "<start of shard>"
            if where in split and where in reported:
                where = f"{where}<after>"  # its skip is already recorded; name the damage separately
            skips.skip(shard, where, "corrupt shard", f"{item.describe()}; rest of shard skipped")
            return
        s = finish(*item)
        if s is not None:
            yield s


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished child processes (Tesseract runs
    as a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def annotate_shard(annotator: Annotator, shard: str, out_path: Path, batch_size: int) -> dict[str, Any]:
    """Annotate one shard into ``out_path`` (atomic: temp file, then rename); returns its counts.

    Counts: ``read`` (keys met = annotated + skipped), ``annotated``, ``with_concept``
    (and ``with_concept_by`` per concept for multi-detector runs), ``skipped`` by reason,
    ``skipped_samples`` (key and reason of each), ``seconds`` (wall) and ``cpu_seconds``
    (:func:`cpu_seconds` spent on the shard: on shared cores the per-core cost, which wall time is not).
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    skips = SkipCounter()
    stats = {"annotated": 0, "with_concept": 0}
    by_concept: dict[str, int] = {}

    def records() -> Iterator[dict[str, Any]]:
        batch: list[Sample] = []
        samples = iter_shard_once(shard, skips)
        while True:
            s = next(samples, None)
            if s is not None:
                batch.append(s)
            if batch and (s is None or len(batch) >= batch_size):
                for rec in annotator.annotate(batch, skips):
                    ann = rec["json"]["annotation"]
                    stats["annotated"] += 1
                    stats["with_concept"] += bool(ann["cells"])
                    for c, v in ann.get("concepts", {}).items():
                        by_concept[c] = by_concept.get(c, 0) + bool(v["cells"])
                    yield rec
                batch = []
            if s is None:
                return

    write_shard(out_path, records())
    counts: dict[str, Any] = {
        "read": stats["annotated"] + skips.total, "annotated": stats["annotated"],
        "with_concept": stats["with_concept"],
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_samples": [{"key": k, "reason": r} for _, k, r in skips.records],
        "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(cpu_seconds() - c0, 3),
    }
    if by_concept:
        counts["with_concept_by"] = dict(sorted(by_concept.items()))
    return counts


# ------------------------------------------------------------------------- manifest


def load_manifest(out: Path) -> dict[str, Any]:
    """``out/_manifest.json`` or an empty one; a damaged manifest is an error naming the file."""
    path = out / MANIFEST
    if path.is_file():
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: damaged manifest ({e}); move it away to redo every shard") from e
        m.setdefault("shards", {})
        return m
    return {"shards": {}}


def save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (:func:`geomerase.data.shards.atomic_write`)."""
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def clean_stale_temps(out: Path) -> list[str]:
    """Remove temp files a killed writer left in ``out`` (``.<name>.*.tmp``); returns their names."""
    gone = []
    for p in out.glob(".*.tmp"):
        try:
            p.unlink()
            gone.append(p.name)
        except FileNotFoundError:
            pass
    if gone:
        log.warning("removed %d stale temp file(s) in %s: %s", len(gone), out, gone[:5])
    return gone


def pending_shards(shards: Sequence[str], out: Path, manifest: dict[str, Any]) -> list[str]:
    """Input shards not yet committed (committed = in the manifest and its output file exists)."""
    names = [Path(s).name for s in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"input shards share file names {dupes[:5]}; output shards are named after them")
    return [s for s in shards if not (Path(s).name in manifest["shards"] and (out / Path(s).name).is_file())]


def finalize_manifest(out: Path, manifest: dict[str, Any], shards: Sequence[str], **run_info: Any) -> dict[str, Any]:
    """Totals over the input shards' entries, plus ``run_info`` under ``last_run``; saved."""
    totals: dict[str, Any] = {"read": 0, "annotated": 0, "with_concept": 0, "skipped": 0, "shards": 0}
    by_reason: dict[str, int] = {}
    for s in shards:
        counts = manifest["shards"].get(Path(s).name)
        if counts is None:
            continue
        totals["shards"] += 1
        for k in ("read", "annotated", "with_concept"):
            totals[k] += counts[k]
        for reason, n in counts["skipped"].items():
            totals["skipped"] += n
            by_reason[reason] = by_reason.get(reason, 0) + n
    totals["skipped_by_reason"] = dict(sorted(by_reason.items()))
    manifest["totals"] = totals
    if run_info:
        manifest["last_run"] = run_info
    save_manifest(out, manifest)
    return manifest


def throughput_line(images: int, seconds: float, engine: str) -> str:
    """``"annotated N images in T s: X images/s (engine)"``."""
    rate = images / seconds if seconds > 0 else float("nan")
    return f"annotated {images} images in {seconds:.1f} s: {rate:.1f} images/s ({engine})"


def annotate_shards(annotator: Annotator, input_glob: str | Sequence[str], out: str | os.PathLike,
                    batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Annotate every input shard not yet committed in ``out`` (one process); returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    shards = expand_urls(input_glob)
    manifest = load_manifest(out)
    todo = pending_shards(shards, out, manifest)
    t0 = time.perf_counter()
    images = 0
    bar = tqdm(todo, desc="annotate", unit="shard", disable=not progress)
    for shard in bar:
        counts = annotate_shard(annotator, shard, out / Path(shard).name, batch_size)
        manifest["shards"][Path(shard).name] = counts
        save_manifest(out, manifest)  # the commit point
        images += counts["read"]
        bar.set_postfix(img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.1f}")
    seconds = time.perf_counter() - t0
    manifest = finalize_manifest(out, manifest, shards, engine="local", shards_done=len(todo), images=images,
                                 seconds=round(seconds, 3))
    if todo and progress:
        log.info(throughput_line(images, seconds, "local"))
    return manifest
