"""Tests for shard writing (deterministic, atomic) and fault-tolerant reading."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geomerase.data.shards import (SkipCounter, encode_png, expand_urls, iter_samples,
                                   split_member_name, write_shard)


def _records(n: int, size: int = 16, prefix: str = "s") -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out.append({"__key__": f"{prefix}_{i:04d}", "png": encode_png(Image.fromarray(arr)),
                    "txt": f"caption number {i} \u00e9", "json": {"index": i, "boxes": [[0, 0, i + 1, 2]]}})
    return out


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_round_trip(tmp_path: Path) -> None:
    recs = _records(7)
    path = tmp_path / "rt.tar"
    assert write_shard(path, recs) == 7
    skips = SkipCounter()
    got = list(iter_samples([str(path)], skips))
    assert skips.total == 0
    assert [s.key for s in got] == [r["__key__"] for r in recs]
    for s, r in zip(got, recs):
        assert s.caption == r["txt"] and s.meta == r["json"] and s.shard == str(path)
        ref = np.asarray(Image.open(io.BytesIO(r["png"])).convert("RGB"))
        assert np.array_equal(np.asarray(s.image), ref)


def test_write_is_deterministic_and_atomic(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", _records(3))
    write_shard(tmp_path / "b.tar", _records(3))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar.getmembers()} == {(0, 0, 0, "")}

    def broken():
        yield from _records(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "c.tar", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]


def test_write_accepts_images_extras_and_rejects_bad_keys(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    write_shard(tmp_path / "x.tar", [{"__key__": "k0", "png": img, "txt": "hi", "json": {"a": np.int64(3)},
                                      "caption2.txt": "rewritten"}])
    (s,) = iter_samples(str(tmp_path / "x.tar"))
    assert s.meta == {"a": 3} and s.image.getpixel((0, 0)) == (1, 2, 3)
    assert s.extras == {"caption2.txt": b"rewritten"}
    with pytest.raises(ValueError, match="key"):
        write_shard(tmp_path / "y.tar", [{"__key__": "bad.key", "txt": "x"}])
    assert not (tmp_path / "y.tar").exists()


def _assert_logged(caplog: pytest.LogCaptureFixture, shard: Path, key: str, reason: str) -> None:
    msgs = [r.getMessage() for r in caplog.records if r.name == "geomerase.data"]
    assert any(str(shard) in m and key in m and reason in m for m in msgs), msgs


def test_bad_image_missing_field_and_bad_json_are_skipped(tmp_path: Path, caplog) -> None:
    good = _records(4)
    png = good[0]["png"]
    path = tmp_path / "mixed.tar"
    _raw_tar(path, [
        ("s_0000.json", b"{}"), ("s_0000.png", png), ("s_0000.txt", b"ok"),
        ("s_0001.json", b"{}"), ("s_0001.png", png[: len(png) // 2]), ("s_0001.txt", b"cut png"),
        ("s_0002.json", b"{}"), ("s_0002.png", b"not a png at all"), ("s_0002.txt", b"junk"),
        ("s_0003.json", b"{}"), ("s_0003.png", png),  # no txt
        ("s_0004.json", b"{not json"), ("s_0004.png", png), ("s_0004.txt", b"x"),
        ("s_0005.json", b"[1, 2]"), ("s_0005.png", png), ("s_0005.txt", b"x"),
        ("s_0006.json", b"{}"), ("s_0006.png", png), ("s_0006.txt", b"last"),
    ])
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="geomerase.data"):
        got = list(iter_samples(str(path), skips))
    assert [s.key for s in got] == ["s_0000", "s_0006"]
    assert skips.counts == {"bad image": 2, "missing field 'txt'": 1, "invalid json": 2}
    _assert_logged(caplog, path, "s_0001", "bad image")
    _assert_logged(caplog, path, "s_0002", "bad image")
    _assert_logged(caplog, path, "s_0003", "missing field 'txt'")
    _assert_logged(caplog, path, "s_0004", "invalid json")
    summary = skips.summary()
    assert summary["total"] == 5
    assert {"shard": str(path), "key": "s_0003", "reason": "missing field 'txt'"} in summary["records"]


def test_require_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "notxt.tar"
    _raw_tar(path, [("a.png", _records(1)[0]["png"]), ("a.json", b"{}")])
    (s,) = iter_samples([str(path)], require=("png", "json"))
    assert s.caption == ""


def test_truncated_tar_keeps_earlier_samples(tmp_path: Path, caplog) -> None:
    path = tmp_path / "trunc.tar"
    write_shard(path, _records(6, size=24))
    data = path.read_bytes()
    # Cut in the middle of the 5th sample's png.
    with tarfile.open(path) as tar:
        png4 = next(m for m in tar.getmembers() if m.name == "s_0004.png")
    path.write_bytes(data[: png4.offset_data + png4.size // 2])
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="geomerase.data"):
        got = list(iter_samples([str(path)], skips))
    assert [s.key for s in got] == ["s_0000", "s_0001", "s_0002", "s_0003"]
    assert skips.counts == {"corrupt shard": 1}
    _assert_logged(caplog, path, "s_0004", "corrupt shard")


def test_corrupt_and_missing_shards_never_fatal(tmp_path: Path, caplog) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00\x01definitely not a tar" * 50)
    good = tmp_path / "good.tar"
    write_shard(good, _records(2))
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="geomerase.data"):
        got = list(iter_samples([str(garbage), str(tmp_path / "absent.tar"), str(good)], skips))
    assert len(got) == 2
    assert skips.counts == {"corrupt shard": 1, "missing shard": 1}
    _assert_logged(caplog, garbage, "start of shard", "corrupt shard")


def test_expand_urls(tmp_path: Path) -> None:
    for i in range(3):
        write_shard(tmp_path / f"icd-qr-{i:06d}.tar", _records(1))
    names = [str(tmp_path / f"icd-qr-{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "icd-qr-*.tar")) == names
    assert expand_urls(str(tmp_path / "icd-qr-{000000..000002}.tar")) == names
    assert expand_urls(str(tmp_path / "icd-qr-00000{2,0}.tar")) == [names[0], names[2]]
    assert expand_urls([names[1], names[0], names[1]]) == names[:2]
    with pytest.raises(FileNotFoundError, match="no shard files match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_split_member_name() -> None:
    assert split_member_name("qr0001_0000003.png") == ("qr0001_0000003", "png")
    assert split_member_name("dir/k.seg.json") == ("dir/k", "seg.json")
    assert split_member_name("README") == ("README", "")


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    path = tmp_path / "w.tar"
    recs = _records(3)
    write_shard(path, recs)
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [g["__key__"] for g in got] == [r["__key__"] for r in recs]
    assert got[0]["txt"].decode() == recs[0]["txt"]


def test_jpg_jpeg_and_webp_fields_are_images(tmp_path: Path) -> None:
    from geomerase.data.shards import IMAGE_EXTS, image_field

    arr = np.random.default_rng(1).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    encoded = {}
    for ext, fmt in [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")]:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        encoded[ext] = buf.getvalue()
    png = encode_png(Image.fromarray(arr))
    recs = [{"__key__": f"k_{ext}", ext: data, "txt": ext, "json": {"key": ext}} for ext, data in encoded.items()]
    recs.append({"__key__": "k_both", "png": png, "jpg": encoded["jpg"], "txt": "both", "json": {}})
    recs.append({"__key__": "k_none", "txt": "no image", "json": {}})
    path = tmp_path / "mixed.tar"
    write_shard(path, recs)
    skips = SkipCounter()
    got = {s.key: s for s in iter_samples(str(path), skips)}
    assert skips.counts == {"missing image": 1}
    for ext, data in encoded.items():
        s = got[f"k_{ext}"]
        assert (s.image_ext, s.image_bytes, s.image.size, s.extras) == (ext, data, (20, 12), {})
    assert got["k_both"].image_ext == "png" and got["k_both"].extras == {"jpg": encoded["jpg"]}
    assert image_field(["json", "webp", "jpg"]) == "jpg" and image_field(["txt"]) is None
    assert IMAGE_EXTS[0] == "png"
