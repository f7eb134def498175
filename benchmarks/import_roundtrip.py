"""``geomerase data import`` at folder scale: every file accounted for, shards equal to the inputs.

    python -m geomerase.benchmarks.import_roundtrip --n 1000 --out benchmarks/results

Writes a folder of ``--n`` images (png, jpg, webp; sides 64-1024 px, some not square) with
captions from same-name ``.txt`` files and from a ``metadata.jsonl``; one image in 20 has no
caption, one in 50 is corrupt (truncated or random bytes), plus a few non-image files. It imports
the folder, then checks that the manifest lists every file with the expected outcome and that the
shards read back (``iter_samples``) give each imported image's bytes (sha256), size and caption.
Results: ``import_cpu.json`` and ``import_cpu.md`` (images/s of the import, the checks).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from geomerase.data.importer import import_folder
from geomerase.data.shards import atomic_write, iter_samples

FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"))


def make_folder(root: Path, n: int, seed: int = 0) -> dict[str, dict]:
    """``n`` images under ``root`` (half with a .txt caption, half in metadata.jsonl); returns the
    expected outcome per relative path: ``{"caption", "sha256", "size"}`` or ``{"skipped": reason}``."""
    rng = random.Random(seed)
    expect: dict[str, dict] = {}
    meta_lines = []
    for i in range(n):
        ext, fmt = FORMATS[i % len(FORMATS)]
        sub = root / f"part{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        rel = f"part{i % 7}/img{i:05d}.{ext}"
        w, h = rng.choice((64, 256, 512, 1024)), rng.choice((64, 256, 512, 1024))
        if i % 50 == 49:  # corrupt: a truncated encoding or random bytes
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (i % 255, 80, 160)).save(buf, fmt)
            data = buf.getvalue()[: len(buf.getvalue()) // 3] if i % 100 == 49 else rng.randbytes(2048)
            (root / rel).write_bytes(data)
            expect[rel] = {"skipped": "corrupt_image"}
            continue
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (i % 255, (7 * i) % 255, 90)).save(buf, fmt)
        (root / rel).write_bytes(buf.getvalue())
        caption = "" if i % 20 == 19 else f"a test image number {i}"
        if caption and i % 2:
            meta_lines.append(json.dumps({"file_name": rel, "text": caption}))
        elif caption:
            (root / rel).with_suffix(".txt").write_text(caption)
        expect[rel] = {"caption": caption, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "size": [w, h]}
    (root / "metadata.jsonl").write_text("\n".join(meta_lines) + "\n")
    for j in range(3):
        (root / f"notes{j}.pdf").write_bytes(b"%PDF-1.4 not an image")
        expect[f"notes{j}.pdf"] = {"skipped": "not_an_image"}
    return expect


def check(expect: dict[str, dict], manifest: dict, out: Path) -> dict:
    """Compare the manifest and the read-back shards with what was written."""
    files = {f["file"]: f for f in manifest["files"] if "companion" not in f}
    missing = sorted(set(expect) - set(files))
    wrong_outcome = sorted(r for r, e in expect.items() if r in files and "skipped" in e
                           and files[r].get("skipped") != e["skipped"])
    read = {s.meta["file_name"]: s for s in iter_samples(str(out / "*.tar"))}
    mismatched = []
    for rel, e in expect.items():
        if "skipped" in e:
            continue
        s = read.get(rel)
        if (s is None or hashlib.sha256(s.image_bytes).hexdigest() != e["sha256"] or list(s.image.size) != e["size"]
                or s.caption != e["caption"]):
            mismatched.append(rel)
    return {"files_written": len(expect), "files_in_manifest": len(manifest["files"]), "missing_from_manifest": missing,
            "wrong_skip_reason": wrong_outcome, "read_back": len(read), "mismatched": mismatched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images in the folder (default: 1000)")
    ap.add_argument("--out", default="benchmarks/results", help="where import_cpu.json/.md go")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        t0 = time.time()
        expect = make_folder(src, a.n)
        t_make = time.time() - t0
        t0 = time.time()
        manifest = import_folder(src, shards, shard_size=256)
        t_import = time.time() - t0
        checks = check(expect, manifest, shards)
    ok = not (checks["missing_from_manifest"] or checks["wrong_skip_reason"] or checks["mismatched"])
    result = {"n": a.n, "import_seconds": round(t_import, 2), "files_per_s": round(checks["files_written"] / t_import, 1),
              "make_seconds": round(t_make, 2), "counts": manifest["counts"], "shards": len(manifest["shards"]),
              "checks": checks, "ok": ok, "host": platform.node(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    atomic_write(out / "import_cpu.json", json.dumps(result, indent=1) + "\n")
    c = manifest["counts"]
    atomic_write(out / "import_cpu.md", "\n".join([
        "# `geomerase data import` round trip (`python -m geomerase.benchmarks.import_roundtrip`)", "",
        f"{a.n} images (png/jpg/webp, 64-1024 px sides), captions from .txt and metadata.jsonl, 1 in 20 uncaptioned, "
        "1 in 50 corrupt, 3 non-image files; one process on the 2-core CPU.", "",
        "| files | imported | skipped | no caption | shards | import s | files/s | manifest complete | shards equal inputs |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {checks['files_written']} | {c['imported']} | {c['skipped']} | {c['no_caption']} | {len(manifest['shards'])} "
        f"| {t_import:.1f} | {result['files_per_s']} | {not checks['missing_from_manifest'] and not checks['wrong_skip_reason']} "
        f"| {not checks['mismatched']} ({checks['read_back']} read back) |", ""]))
    print(json.dumps(result, indent=1))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
