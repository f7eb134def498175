"""Import a folder of images with captions as webdataset shards in img2dataset's layout.

``geomerase data import --input FOLDER --out OUTDIR`` writes to OUTDIR:

* shards ``00000.tar``, ``00001.tar``, ... of at most ``shard_size`` samples each;
* sample keys in img2dataset's scheme ``"%05d%04d" % (shard, index in shard)``: nine digits,
  ``000000000`` is the first sample of ``00000.tar``, ``000010000`` the first of ``00001.tar``
  (so a shard holds at most 10,000 samples and there are at most 100,000 shards);
* per sample ``KEY.<ext>``, the image file's bytes unchanged (``ext`` is the file's lower-case
  extension, ``.jpeg`` written as ``jpg``), ``KEY.txt`` the caption and ``KEY.json`` img2dataset's
  fields (``key``, ``caption``, ``status``, ``width``, ``height``, ``original_width``,
  ``original_height``, ``sha256`` of the image bytes) plus ``file_name``, the image's path
  relative to the input folder;
* ``_manifest.json``: the input folder, counts, the samples per shard, the outcome of every
  file under the input folder (its key, ``skipped`` with a reason, or ``companion``), the
  metadata.jsonl lines that gave no caption and the folders that could not be listed.

Files are walked recursively in sorted order, so the same folder always gives the same bytes.
A caption comes from a ``metadata.jsonl`` (diffusers ``imagefolder``: one JSON object per line,
``file_name`` relative to the folder holding that metadata.jsonl, caption under ``text``), else
from a same-name ``.txt`` beside the image (``a/b/cat.jpg`` + ``a/b/cat.txt``); where both exist
the metadata.jsonl wins. An image without a caption is imported with an empty one and counted as
``no_caption``. Skipped, each with one warning naming the file: ``not_an_image`` (an extension
outside :data:`~geomerase.data.shards.IMAGE_EXTS`; ``.txt``, ``.json`` and ``.jsonl`` files are
companions, listed but not skipped), ``corrupt_image`` (PIL cannot verify and load it),
``unreadable`` (the file cannot be read) and ``bad_caption`` (its ``.txt`` is not UTF-8).

The output folder is built beside OUTDIR and renamed into place when complete, so an interrupted
import leaves no partial OUTDIR.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from geomerase.data.shards import IMAGE_EXTS, atomic_dir, atomic_write, decode_image, write_shard

__all__ = ["import_folder", "file_image_ext", "MANIFEST", "METADATA", "MAX_SHARD_SIZE"]

log = logging.getLogger("geomerase.data")

MANIFEST = "_manifest.json"
METADATA = "metadata.jsonl"
COMPANION_EXTS = ("txt", "json", "jsonl")
"""Extensions of caption and metadata files: listed as companions, never skipped as not_an_image."""
MAX_SHARD_SIZE = 10_000
"""Samples per shard the four index digits of a key allow."""
MAX_SHARDS = 100_000
"""Shards the five shard digits of a key allow."""


def file_image_ext(name: str) -> str | None:
    """The shard field a file's image goes to: its lower-case extension with ``jpeg`` as ``jpg``,
    or None when the extension is not one of :data:`~geomerase.data.shards.IMAGE_EXTS`."""
    ext = _ext(name)
    if ext not in IMAGE_EXTS:
        return None
    return "jpg" if ext == "jpeg" else ext


def _ext(name: str) -> str:
    """A path's lower-case extension without the dot ("" when it has none)."""
    return posixpath.splitext(name)[1][1:].lower()


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """Every file under ``root`` as a POSIX path relative to it, sorted (links to folders not
    followed), and the folders that could not be listed (each logged)."""
    found: list[str] = []
    unlisted: list[str] = []

    def failed(exc: OSError) -> None:
        log.warning("skipped folder %s: cannot list it (%s)", exc.filename, exc.strerror or exc)
        unlisted.append(Path(exc.filename).relative_to(root).as_posix())

    for folder, dirs, names in os.walk(root, onerror=failed):
        dirs.sort()
        rel = Path(folder).relative_to(root).as_posix()
        found.extend(n if rel == "." else f"{rel}/{n}" for n in names)
    return sorted(found), sorted(unlisted)


@dataclass
class _Image:
    """One image that decoded: its file, field, bytes, size and caption."""

    rel: str
    ext: str
    data: bytes
    width: int
    height: int
    caption: str
    caption_from: str | None


class _FolderImport:
    """One import: the input's files, their captions and the outcome of each file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files, self.unlisted_folders = _walk(root)
        self.present = set(self.files)
        self.outcome: dict[str, dict[str, Any]] = {}
        self.metadata_errors: list[dict[str, Any]] = []
        self.metadata: dict[str, tuple[str, str]] = {}
        """Image path -> (caption, the metadata.jsonl it came from)."""
        for rel in self.files:
            if posixpath.basename(rel) == METADATA:
                self._read_metadata(rel)

    def _metadata_error(self, rel: str, line: int, message: str) -> None:
        log.warning("%s line %d: %s", self.root / rel, line, message)
        self.metadata_errors.append({"file": rel, "line": line, "error": message})

    def _read_metadata(self, rel: str) -> None:
        """Add the captions of one metadata.jsonl; each bad line is logged and recorded, never fatal."""
        try:
            lines = (self.root / rel).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            self._metadata_error(rel, 0, f"cannot read: {exc}")
            return
        base = posixpath.dirname(rel)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                self._metadata_error(rel, n, f"invalid json: {exc}")
                continue
            name = obj.get("file_name") if isinstance(obj, dict) else None
            text = obj.get("text", "") if isinstance(obj, dict) else None
            if not isinstance(name, str) or not isinstance(text, str):
                self._metadata_error(rel, n, "need an object with a string 'file_name' and a string 'text'")
                continue
            target = posixpath.normpath(posixpath.join(base, name))
            if target not in self.present:
                self._metadata_error(rel, n, f"file_name {name!r}: no such file in the input folder")
            elif target in self.metadata:
                self._metadata_error(rel, n, f"file_name {name!r} already has a caption; the first is kept")
            else:
                self.metadata[target] = (text.strip(), rel)

    def _skip(self, rel: str, reason: str, detail: str) -> None:
        log.warning("skipped %s: %s (%s)", self.root / rel, reason, detail)
        self.outcome[rel] = {"skipped": reason}

    def _caption(self, rel: str) -> tuple[str, str | None]:
        """``(caption, where it came from)``; raises OSError or UnicodeDecodeError for a .txt that
        cannot be read as UTF-8."""
        if rel in self.metadata:
            return self.metadata[rel]
        txt = posixpath.splitext(rel)[0] + ".txt"
        if txt not in self.present:
            return "", None
        return (self.root / txt).read_bytes().decode("utf-8-sig").strip(), txt

    def images(self) -> Iterator[_Image]:
        """The images that decode, in sorted path order; every other image file is skipped and logged."""
        for rel in self.files:
            ext = file_image_ext(rel)
            if ext is None:
                if _ext(rel) not in COMPANION_EXTS:
                    self._skip(rel, "not_an_image", f"extension not one of {', '.join(IMAGE_EXTS)}")
                continue
            try:
                data = (self.root / rel).read_bytes()
            except OSError as exc:
                self._skip(rel, "unreadable", str(exc))
                continue
            try:
                img = decode_image(data)
            except Exception as exc:  # PIL raises many types for bad data
                self._skip(rel, "corrupt_image", f"{type(exc).__name__}: {exc}")
                continue
            try:
                caption, source = self._caption(rel)
            except (OSError, UnicodeDecodeError) as exc:
                self._skip(rel, "bad_caption", f"{posixpath.splitext(rel)[0]}.txt: {exc}")
                continue
            yield _Image(rel, ext, data, img.width, img.height, caption, source)

    def record(self, image: _Image, key: str) -> dict[str, Any]:
        """The shard record of ``image`` under ``key``; notes the image's outcome."""
        self.outcome[image.rel] = {"key": key, "caption_from": image.caption_from}
        if not image.caption:
            self.outcome[image.rel]["no_caption"] = True
        meta = {"key": key, "caption": image.caption, "status": "success", "width": image.width,
                "height": image.height, "original_width": image.width, "original_height": image.height,
                "sha256": hashlib.sha256(image.data).hexdigest(), "file_name": image.rel}
        return {"__key__": key, image.ext: image.data, "txt": image.caption, "json": meta}

    def files_report(self) -> list[dict[str, Any]]:
        """Every input file with its outcome; files neither imported nor skipped are companions:
        ``caption`` (a .txt some image took its caption from), ``metadata`` or ``unused``."""
        captions = {o.get("caption_from") for o in self.outcome.values()}
        out = []
        for rel in self.files:
            if rel in self.outcome:
                out.append({"file": rel, **self.outcome[rel]})
            elif posixpath.basename(rel) == METADATA:
                out.append({"file": rel, "companion": "metadata"})
            else:
                out.append({"file": rel, "companion": "caption" if rel in captions else "unused"})
        return out


def _write_shards(job: _FolderImport, out: Path, shard_size: int) -> dict[str, int]:
    """Write the images of ``job`` into shards of ``shard_size``; returns samples per shard name."""
    images = job.images()
    shards: dict[str, int] = {}
    while (first := next(images, None)) is not None:
        shard = len(shards)
        if shard >= MAX_SHARDS:
            raise ValueError(f"more than {MAX_SHARDS} shards of {shard_size} images: raise --shard-size")
        chunk = itertools.chain([first], itertools.islice(images, shard_size - 1))
        name = f"{shard:05d}.tar"
        shards[name] = write_shard(out / name, (job.record(im, f"{shard:05d}{i:04d}") for i, im in enumerate(chunk)))
    return shards


def _check_paths(root: Path, out: Path, shard_size: int) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"--shard-size {shard_size}: need 1 to {MAX_SHARD_SIZE} (keys have four index digits)")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ValueError(f"output folder {out} lies inside the input folder {root}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} is not an empty folder; import into a new or empty folder")


def import_folder(input_dir: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000) -> dict[str, Any]:
    """Import the images under ``input_dir`` into shards in ``out``; returns the manifest.

    ``out`` must be absent or empty (it is replaced as a whole when the import completes).
    Raises FileNotFoundError naming ``input_dir`` when it is not a folder, ValueError for a
    bad ``shard_size`` or ``out``; bad files never stop the import.
    """
    root, out = Path(input_dir), Path(out)
    _check_paths(root, out, shard_size)
    job = _FolderImport(root)
    with atomic_dir(out) as tmp:
        shards = _write_shards(job, tmp, shard_size)
        files = job.files_report()
        skipped: dict[str, int] = {}
        for f in files:
            if "skipped" in f:
                skipped[f["skipped"]] = skipped.get(f["skipped"], 0) + 1
        counts = {"files": len(files), "imported": sum(shards.values()), "skipped": dict(sorted(skipped.items())),
                  "no_caption": sum(1 for f in files if f.get("no_caption")),
                  "companions": sum(1 for f in files if "companion" in f),
                  "metadata_errors": len(job.metadata_errors), "unlisted_folders": len(job.unlisted_folders)}
        manifest = {"input": str(root.resolve()), "shard_size": shard_size,
                    "key_scheme": "%05d%04d % (shard, index in shard)", "counts": counts, "shards": shards,
                    "files": files, "metadata_errors": job.metadata_errors,
                    "unlisted_folders": job.unlisted_folders}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if not shards:
        log.warning("no image imported from %s (see %s)", root, out / MANIFEST)
    return manifest
