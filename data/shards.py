"""Deterministic, atomic webdataset shard writing and fault-tolerant reading.

Shards are plain POSIX tar files in the webdataset layout: one member per
field, named ``<key>.<ext>``, members of a sample adjacent.  Writing is
byte-reproducible (fixed mtime/uid/gid/mode, sorted fields, canonical json)
and atomic (temp file in the same directory, fsync, ``os.replace``), so an
interrupted build never leaves a half shard under the final name.

Reading never stops on bad data: every skipped sample is counted by reason in a
:class:`SkipCounter` and logged with its shard and key, and a truncated or
corrupt tar keeps the samples that precede the damage.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

__all__ = ["Sample", "SkipCounter", "iter_samples", "write_shard", "expand_urls", "encode_png",
           "split_member_name", "IMAGE_EXTS", "IMAGE", "image_field", "missing_requirement", "decode_image"]

log = logging.getLogger("geomerase.data")

# Fixed tar header fields: any varying value (mtime, owner) would make two
# builds of the same dataset differ byte-wise.
_MTIME = 0
_MODE = 0o644

IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
"""Field names that hold a sample's image (encoded bytes), in order of preference when a sample has
several. The one owner of the set: readers find the image with :func:`image_field`."""

IMAGE = "image"
"""The requirement name (in ``require``) met by any field of :data:`IMAGE_EXTS`."""


def image_field(fields: Iterable[str]) -> str | None:
    """The field of a sample that holds its image (the first of :data:`IMAGE_EXTS` present), or None."""
    present = set(fields)
    return next((ext for ext in IMAGE_EXTS if ext in present), None)


def missing_requirement(fields: dict[str, bytes], require: Iterable[str]) -> str | None:
    """The skip reason for the first requirement ``fields`` lack, or None when all are met.

    A requirement is a field name (``"txt"``: reason ``"missing field 'txt'"``) or :data:`IMAGE`
    (met by any field of :data:`IMAGE_EXTS`; reason ``"missing image"``)."""
    for req in require:
        if req == IMAGE:
            if image_field(fields) is None:
                return "missing image"
        elif req not in fields:
            return f"missing field '{req}'"
    return None


@dataclass
class Sample:
    """One decoded sample; ``extras`` holds raw bytes of fields beyond the image, txt and json.

    ``image_ext`` and ``image_bytes`` are the image's field name and its encoded bytes as stored
    in the shard (empty for a sample without an image or one built in memory)."""

    key: str
    image: Image.Image | None
    caption: str
    meta: dict
    shard: str
    extras: dict[str, bytes] = field(default_factory=dict)
    image_ext: str = ""
    image_bytes: bytes = b""


class SkipCounter:
    """Counts skipped samples by reason and keeps a record of each skip.

    ``max_records`` caps the stored records (counts stay exact) so a badly
    broken dataset cannot exhaust memory through the bookkeeping.
    """

    def __init__(self, max_records: int = 10_000) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[tuple[str, str, str]] = []
        self.max_records = max_records

    def skip(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        """Record one skip and log a warning naming shard, key and reason."""
        self.counts[reason] += 1
        if len(self.records) < self.max_records:
            self.records.append((shard, key, reason))
        extra = f" ({detail})" if detail else ""
        log.warning("skipped sample %r in shard %s: %s%s", key, shard, reason, extra)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: total, counts per reason and the stored records."""
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "records": [{"shard": s, "key": k, "reason": r} for s, k, r in self.records],
        }


# ------------------------------------------------------------------- encoding


def _json_default(obj: Any) -> Any:
    # Boxes and attributes are often numpy scalars; json can't serialise them.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def encode_json(obj: Any) -> bytes:
    """Canonical json bytes (sorted keys, compact) so output is reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode("utf-8")


def encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes with no ancillary chunks (no time stamp, no text), so stable."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level, optimize=False)
    return buf.getvalue()


def _encode_field(ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Image.Image):
        if ext != "png":
            raise ValueError(f"only the 'png' field may hold a PIL image, not {ext!r}")
        return encode_png(value)
    if isinstance(value, (dict, list, tuple, int, float, bool)) or value is None:
        return encode_json(value)
    raise TypeError(f"cannot encode field {ext!r} of type {type(value).__name__}")


_KEY_RE = re.compile(r"^[^./][^.]*$")


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """A binary file handle whose contents appear at ``path`` only when the block ends without an
    error (temp file in the same folder, fsync, ``os.replace``); on error nothing is left behind.
    The one owner of atomic file writes in the package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the result gets an ordinary file's mode
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as utf-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (renames; an existing
    folder is moved aside first and removed after), on error it is removed. The folder counterpart
    of :func:`atomic_open`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shard(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` to the tar shard ``path`` deterministically and atomically.

    Each record is ``{"__key__": key, ext: value, ...}``; values may be bytes,
    str (utf-8), a PIL image (``png`` only) or json-able objects.  Fields are
    written in sorted order with fixed tar headers.  Returns the number of
    samples written.  Keys must not contain dots (webdataset splits the key
    from the extension at the first dot).
    """
    n = 0
    with atomic_open(path) as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in records:
                key = rec.get("__key__")
                if not isinstance(key, str) or not _KEY_RE.match(key):
                    raise ValueError(f"invalid sample key {key!r}: need a non-empty str without dots")
                for ext in sorted(k for k in rec if not k.startswith("__")):
                    data = _encode_field(ext, rec[ext])
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = _MTIME
                    info.mode = _MODE
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return n


# -------------------------------------------------------------------- reading


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, ext) the way webdataset does.

    The key is the directory plus the base name up to its first dot; ``ext``
    is everything after that dot ("" when there is none).
    """
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext if dot else ""


def decode_image(data: bytes) -> Image.Image:
    """RGB image decoded from encoded bytes (any format PIL reads); raises on damaged data.

    ``verify()`` catches broken chunk CRCs cheaply but leaves the image unusable, and ``load()``
    catches truncated pixel data ``verify()`` may miss: both run."""
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _build_sample(key: str, fields: dict[str, bytes], shard: str, require: tuple[str, ...],
                  skips: SkipCounter) -> Sample | None:
    reason = missing_requirement(fields, require)
    if reason is not None:
        skips.skip(shard, key, reason, f"present: {sorted(fields) or 'none'}")
        return None
    image = None
    image_ext = image_field(fields)
    if image_ext is not None:
        try:
            image = decode_image(fields[image_ext])
        except Exception as exc:  # PIL raises many types for bad data
            skips.skip(shard, key, "bad image", f"field '{image_ext}': {type(exc).__name__}: {exc}")
            return None
    caption = ""
    if "txt" in fields:
        try:
            caption = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            skips.skip(shard, key, "bad caption", f"field 'txt': {exc}")
            return None
    meta: dict = {}
    if "json" in fields:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            skips.skip(shard, key, "invalid json", f"field 'json': {exc}")
            return None
        if not isinstance(meta, dict):
            skips.skip(shard, key, "invalid json", f"field 'json' is a {type(meta).__name__}, not an object")
            return None
    extras = {k: v for k, v in fields.items() if k not in (image_ext, "txt", "json")}
    return Sample(key=key, image=image, caption=caption, meta=meta, shard=shard, extras=extras,
                  image_ext=image_ext or "", image_bytes=fields[image_ext] if image_ext else b"")


TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)
"""What reading a damaged or truncated (possibly compressed) tar can raise."""


@dataclass
class TarDamage:
    """Last item of :func:`iter_key_groups` when the shard is damaged: ``key`` is the sample
    being read when the damage was met (its fields are lost), None at the start of the shard."""

    key: str | None
    error: BaseException

    def describe(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


def iter_key_groups(shard: str) -> Iterator[tuple[str, dict[str, bytes]] | TarDamage]:
    """``(key, {ext: bytes})`` for each run of adjacent members sharing a key, in tar order.

    The tar is read in stream mode, so everything before a damaged header or a truncated
    member is still delivered; the damage ends the iteration with one :class:`TarDamage`.
    Members without an extension and non-files are ignored. A key whose members are not
    adjacent comes out as several groups (callers that care detect it).
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue  # directories etc. carry no sample data
                mkey, ext = split_member_name(member.name)
                if not ext:
                    log.debug("ignoring member %r without extension in %s", member.name, shard)
                    continue
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} truncated")
                if mkey != key:
                    if key is not None:
                        yield key, fields
                    key, fields = mkey, {}
                fields[ext] = data
    except TAR_ERRORS as exc:
        yield TarDamage(key, exc)
        return
    if key is not None:
        yield key, fields


def _iter_shard(shard: str, require: tuple[str, ...], skips: SkipCounter) -> Iterator[Sample]:
    for item in iter_key_groups(shard):
        if isinstance(item, TarDamage):
            # The pending sample may be cut short: report it as part of the damage
            # instead of as a misleading "missing field".
            skips.skip(shard, item.key or "<start of shard>", "corrupt shard",
                       f"{item.describe()}; rest of shard skipped")
            return
        sample = _build_sample(item[0], item[1], shard, require, skips)
        if sample is not None:
            yield sample


def iter_samples(urls: list[str] | str, skips: SkipCounter | None = None,
                 require: tuple[str, ...] = (IMAGE, "txt", "json")) -> Iterator[Sample]:
    """Yield decoded samples from tar shards, skipping (and counting) bad ones.

    ``urls`` is a list of shard paths or a single glob/brace pattern (see
    :func:`expand_urls`).  ``require`` names the fields a sample must have
    (:data:`IMAGE`: any image field, see :func:`missing_requirement`); the image
    is the field :func:`image_field` picks, so img2dataset shards (``jpg``)
    read as they are.  Skips are recorded in ``skips`` (a private counter
    is used when None, so problems are still logged).  Reasons: "corrupt
    shard", "missing shard", "bad image", "missing image", "missing field '<ext>'",
    "invalid json", "bad caption".
    """
    skips = skips if skips is not None else SkipCounter()
    shards = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    for shard in shards:
        if not os.path.exists(shard):
            skips.skip(shard, "<all>", "missing shard", "file not found")
            continue
        yield from _iter_shard(shard, tuple(require), skips)


# ------------------------------------------------------------------ expansion

_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _brace_expand(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{a,b}`` alternatives and ``{000..009}`` ranges."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    m = _RANGE_RE.match(body)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        width = len(m.group(1)) if m.group(1).lstrip("-").startswith("0") else 0
        step = 1 if b >= a else -1
        options = [f"{i:0{width}d}" for i in range(a, b + step, step)]
    else:
        # Split on top-level commas only so nested groups survive.
        options, depth, cur = [], 0, ""
        for ch in body:
            if ch == "," and depth == 0:
                options.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        options.append(cur)
        if len(options) == 1:  # "{x}" is literal in bash
            return [head + "{" + p for p in _brace_expand(body + "}" + tail)]
    out: list[str] = []
    for opt in options:
        out.extend(_brace_expand(head + opt + tail))
    return out


def expand_urls(pattern: str | os.PathLike | list) -> list[str]:
    """Expand braces and globs into a sorted, de-duplicated list of existing shard files.

    Accepts a pattern, a path or a list of them.  Raises FileNotFoundError
    naming the pattern when nothing matches.
    """
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    found: set[str] = set()
    for pat in patterns:
        for p in _brace_expand(os.fspath(pat)):
            p = os.path.expanduser(p)
            if glob.has_magic(p):
                found.update(m for m in glob.glob(p) if os.path.isfile(m))
            elif os.path.isfile(p):
                found.add(p)
    if not found:
        raise FileNotFoundError(f"no shard files match {pattern!r}")
    return sorted(found)
