"""`geomerase data import`: image folder -> img2dataset-layout shards; img2dataset shards read and annotated."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geomerase.data.importer import MANIFEST, file_image_ext, import_folder
from geomerase.data.shards import SkipCounter, iter_samples
from geomerase.data.webdataset_loader import decode_raw, iter_raw


def _encode(size: tuple[int, int], fmt: str, seed: int, **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _put(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    """20 good images (png, jpg, jpeg, webp; 16-51 px), 2 corrupt ones, 1 non-image, companions.

    Returns the folder and, per good image, ``(expected field, expected caption)``."""
    root = tmp_path_factory.mktemp("imgs") / "in"
    want: dict[str, tuple[str, str]] = {}
    for i in range(6):  # png + .txt
        _put(root, f"a/p{i}.png", _encode((16 + 5 * i, 20 + 3 * i), "PNG", i))
        _put(root, f"a/p{i}.txt", f"png number {i}\n")
        want[f"a/p{i}.png"] = ("png", f"png number {i}")
    lines = []
    for i in range(6):  # jpg captioned by b/metadata.jsonl, two of them one folder down
        rel = f"c/j{i}.jpg" if i >= 4 else f"j{i}.jpg"
        _put(root, f"b/{rel}", _encode((24 + 4 * i, 18 + 2 * i), "JPEG", 10 + i, quality=90))
        lines.append(json.dumps({"file_name": rel, "text": f"jpg number {i}"}))
        want[f"b/{rel}"] = ("jpg", f"jpg number {i}")
    lines += ["{not json", json.dumps({"file_name": "gone.jpg", "text": "no such file"})]
    _put(root, "b/metadata.jsonl", "\n".join(lines) + "\n")
    _put(root, "b/j0.txt", "loses to metadata.jsonl")
    for i in range(4):  # webp (lossy and lossless) + .txt
        _put(root, f"w/v{i}.webp", _encode((30 + i, 17 + 7 * i), "WEBP", 20 + i, lossless=i % 2 == 0))
        _put(root, f"w/v{i}.txt", f"webp number {i}")
        want[f"w/v{i}.webp"] = ("webp", f"webp number {i}")
    _put(root, "Photo.JPEG", _encode((40, 33), "JPEG", 30))
    _put(root, "Photo.txt", "an upper-case jpeg")
    want["Photo.JPEG"] = ("jpg", "an upper-case jpeg")
    for i in range(2):  # .jpeg one folder down, captioned by the top folder's metadata.jsonl
        _put(root, f"d/e{i}.jpeg", _encode((20, 28 + i), "JPEG", 40 + i))
        want[f"d/e{i}.jpeg"] = ("jpg", f"jpeg number {i}")
    _put(root, "metadata.jsonl", "".join(json.dumps({"file_name": f"./d/e{i}.jpeg", "text": f" jpeg number {i} "}) + "\n"
                                         for i in range(2)))
    _put(root, "nocap.png", _encode((51, 16), "PNG", 31))
    want["nocap.png"] = ("png", "")
    good_jpg = _encode((64, 64), "JPEG", 32)
    _put(root, "bad/trunc.jpg", good_jpg[: len(good_jpg) // 2])
    _put(root, "bad/noise.png", np.random.default_rng(33).bytes(500))
    _put(root, "notes.pdf", b"%PDF-1.4 not an image")
    _put(root, "orphan.txt", "a caption without an image")
    return root, want


@pytest.fixture(scope="module")
def imported(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp") / "out"
    import_folder(folder[0], out, shard_size=8)
    return out


def test_every_input_file_is_in_the_manifest_with_its_outcome(folder, imported):
    root, want = folder
    m = json.loads((imported / MANIFEST).read_text())
    files = {f["file"]: f for f in m["files"]}
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert [f["file"] for f in m["files"]] == on_disk
    keys = [files[rel]["key"] for rel in sorted(want)]
    assert keys == [f"{s:05d}{i:04d}" for s in range(3) for i in range(8)][:20]  # sorted paths, %05d%04d
    assert files["bad/trunc.jpg"] == {"file": "bad/trunc.jpg", "skipped": "corrupt_image"}
    assert files["bad/noise.png"]["skipped"] == "corrupt_image"
    assert files["notes.pdf"]["skipped"] == "not_an_image"
    assert files["nocap.png"]["no_caption"] is True and files["nocap.png"]["caption_from"] is None
    assert files["b/j0.jpg"]["caption_from"] == "b/metadata.jsonl" and files["a/p0.png"]["caption_from"] == "a/p0.txt"
    assert files["a/p0.txt"]["companion"] == "caption" and files["b/metadata.jsonl"]["companion"] == "metadata"
    assert files["b/j0.txt"]["companion"] == files["orphan.txt"]["companion"] == "unused"
    assert m["counts"] == {"files": len(on_disk), "imported": 20, "no_caption": 1, "companions": 15,
                           "skipped": {"corrupt_image": 2, "not_an_image": 1}, "metadata_errors": 2,
                           "unlisted_folders": 0}
    assert m["shards"] == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 4}
    assert [e["line"] for e in m["metadata_errors"]] == [7, 8]
    assert sorted(p.name for p in imported.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", MANIFEST]


def test_skips_log_one_line_naming_the_file(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="geomerase.data"):
        import_folder(folder[0], tmp_path / "out", shard_size=100)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skips) == 3 and all("\n" not in s for s in skips)
    for rel, reason in [("bad/trunc.jpg", "corrupt_image"), ("bad/noise.png", "corrupt_image"),
                        ("notes.pdf", "not_an_image")]:
        assert any(str(folder[0] / rel) in s and reason in s for s in skips), skips
    assert any("metadata.jsonl line 7: invalid json" in r.getMessage() for r in caplog.records)


def test_shards_give_back_the_input_bytes_sizes_and_captions(folder, imported):
    root, want = folder
    skips = SkipCounter()
    samples = list(iter_samples(str(imported / "*.tar"), skips))
    assert skips.total == 0 and len(samples) == 20
    for s in samples:
        rel = s.meta["file_name"]
        data = (root / rel).read_bytes()
        assert (s.image_ext, s.caption) == want[rel]
        assert hashlib.sha256(s.image_bytes).hexdigest() == hashlib.sha256(data).hexdigest() == s.meta["sha256"]
        assert s.image.size == Image.open(io.BytesIO(data)).size == (s.meta["width"], s.meta["height"])
        assert s.meta["key"] == s.key and s.meta["status"] == "success" and s.meta["caption"] == s.caption
        assert (s.meta["original_width"], s.meta["original_height"]) == s.image.size
    # The streaming (webdataset) loader reads the same bytes and captions.
    for shard in sorted(imported.glob("*.tar")):
        for raw in iter_raw(str(shard), skips):
            d = decode_raw(raw, 16, skips)
            rel = json.loads(raw.fields["json"])["file_name"]
            ext, caption = want[rel]
            assert raw.fields[ext] == (root / rel).read_bytes()
            assert d.record.caption == caption and d.image.shape == (3, 16, 16) and d.record.cells == []
    assert skips.total == 0


def test_reimport_is_byte_identical(folder, imported, tmp_path):
    import_folder(folder[0], tmp_path / "again", shard_size=8)
    for shard in sorted(imported.glob("*.tar")):
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((tmp_path / "again" / MANIFEST).read_text())["files"] == \
        json.loads((imported / MANIFEST).read_text())["files"]


def test_bad_arguments_are_errors_naming_the_folder(folder, imported, tmp_path):
    root = folder[0]
    with pytest.raises(FileNotFoundError, match="input folder not found: .*missing"):
        import_folder(tmp_path / "missing", tmp_path / "o1")
    with pytest.raises(ValueError, match="not an empty folder"):
        import_folder(root, imported)
    with pytest.raises(ValueError, match="inside the input folder"):
        import_folder(root, root / "shards")
    with pytest.raises(ValueError, match="--shard-size 10001"):
        import_folder(root, tmp_path / "o2", shard_size=10001)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [file_image_ext(n) for n in ("a.JPEG", "b.jpg", "c.webp", "d.png", "e.gif", "f")] == \
        ["jpg", "jpg", "webp", "png", None, None]


# ----------------------------------------------------------- img2dataset's own output

def _big_qr_image():
    from geomerase.data.icd import make_sample

    for i in range(40):
        img, _, meta = make_sample("qr", 0, i, 256, carry=True)
        x1, _, x2, _ = meta["boxes"][0]
        if x2 - x1 >= 70:  # well above OpenCV's floor, also after JPEG compression
            return img
    raise AssertionError("no large QR code in the first 40 samples")


def _img2dataset_shard(path: Path) -> dict[str, bytes]:
    """``00000.tar`` as img2dataset writes it: a QR image and a clean one, jpg + txt + json."""
    from geomerase.data.icd import make_sample

    clean, _, _ = make_sample("qr", 0, 1, 256, carry=False)
    images = {}
    with tarfile.open(path, "w") as tar:
        for i, (img, caption) in enumerate([(_big_qr_image(), "a poster on a wall"), (clean, "a plain scene")]):
            key = f"{i:09d}"
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            images[key] = buf.getvalue()
            meta = {"url": f"http://example.invalid/{i}.jpg", "key": key, "status": "success", "error_message": None,
                    "caption": caption, "width": 256, "height": 256, "original_width": 512, "original_height": 512,
                    "exif": "{}", "sha256": hashlib.sha256(images[key]).hexdigest()}
            for ext, data in [("jpg", images[key]), ("txt", caption.encode()), ("json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return images


def test_img2dataset_shards_are_read_and_annotated(tmp_path, capsys):
    from geomerase.cli import main

    (tmp_path / "in").mkdir()
    images = _img2dataset_shard(tmp_path / "in" / "00000.tar")
    got = list(iter_samples(str(tmp_path / "in" / "*.tar")))
    assert [(s.key, s.image_ext, s.image.size) for s in got] == [("000000000", "jpg", (256, 256)),
                                                                 ("000000001", "jpg", (256, 256))]
    argv = ["annotate", "--input", str(tmp_path / "in" / "*.tar"), "--detector", "qr", "--concept", "qr",
            "--out", str(tmp_path / "ann")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["annotated"] == 2
    qr, clean = iter_samples(str(tmp_path / "ann" / "*.tar"))
    assert qr.image_ext == clean.image_ext == "jpg"
    assert qr.image_bytes == images["000000000"] and clean.image_bytes == images["000000001"]  # not re-encoded
    assert qr.meta["annotation"]["cells"] and "<l" in qr.caption and qr.caption.startswith("a poster on a wall, qr")
    assert clean.meta["annotation"]["cells"] == [] and clean.caption == "a plain scene"
    assert qr.meta["sha256"] == hashlib.sha256(images["000000000"]).hexdigest()  # img2dataset fields kept
    # Without ground truth in the json, the oracle skips each sample with its reason instead of failing.
    assert main(argv[:4] + ["oracle", "--concept", "qr", "--out", str(tmp_path / "oracle")]) == 0
    m = json.loads((tmp_path / "oracle" / MANIFEST).read_text())
    assert m["totals"]["annotated"] == 0 and m["totals"]["skipped_by_reason"] == {"detector error": 2}


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    import os

    _put(tmp_path / "in", "x/a.png", _encode((8, 8), "PNG", 0))
    _put(tmp_path / "in", "b.png", _encode((8, 8), "PNG", 1))
    scandir = os.scandir

    def refuse_x(path="."):
        if str(path).endswith("/x"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_x)
    m = import_folder(tmp_path / "in", tmp_path / "out")
    assert m["unlisted_folders"] == ["x"] and m["counts"]["imported"] == 1


def test_a_caption_that_is_not_utf8_skips_its_image_with_the_reason(tmp_path):
    _put(tmp_path / "in", "cafe.png", _encode((8, 8), "PNG", 0))
    _put(tmp_path / "in", "cafe.txt", "caf\xe9".encode("latin-1"))
    _put(tmp_path / "in", "up.png", _encode((8, 8), "PNG", 1))
    _put(tmp_path / "in", "metadata.jsonl", json.dumps({"file_name": "../up.png", "text": "outside"}) + "\n")
    m = import_folder(tmp_path / "in", tmp_path / "out")
    files = {f["file"]: f for f in m["files"]}
    assert files["cafe.png"] == {"file": "cafe.png", "skipped": "bad_caption"}
    assert files["up.png"]["no_caption"] and "no such file" in m["metadata_errors"][0]["error"]
