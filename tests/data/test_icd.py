"""Tests for the ICD generator: scenes, overlays and deterministic shard building."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from geomerase.data import concepts, icd, scenes
from geomerase.data.icd import build_icd, has_concept, make_sample
from geomerase.data.shards import SkipCounter, iter_samples

# Words that would leak the implicit concept into the caption.
LEAK = re.compile(r"\b(qr|code|codes|watermark\w*|text|logo\w*|letters?|words?|caption|sign|"
                  r"stamp|brand|font|url)\b", re.I)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(out.glob("*.tar"))}


# ----------------------------------------------------------------- scenes


def test_scene_vocab_and_attributes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        attrs = scenes.scene_attributes(scene)
        assert attrs["background"] in scenes.BACKGROUNDS
        assert attrs["shape"] in scenes.SHAPES
        assert attrs["colour"] in scenes.COLOURS
        assert 0.35 <= scene.objects[0].size <= 0.60
        assert len(scene.objects) in (1, 2)
        for obj in scene.objects:
            assert obj.colour != scene.background
            # Objects stay inside the frame so position words are truthful.
            assert all(obj.size / 2 <= c <= 1 - obj.size / 2 for c in obj.centre)


def test_captions_mention_scene_but_never_concepts() -> None:
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(2000):
        scene = scenes.sample_scene(rng)
        text = scenes.caption(scene, rng)
        assert not LEAK.search(text), text
        main = scene.objects[0]
        assert main.colour in text and main.shape in text and scene.background in text, text
        seen.add(text.split(" ")[0])
    assert len(seen) >= 5, "captions should use varied templates"


@pytest.mark.parametrize("size", [16, 32, 256])
def test_render_scene_keeps_background_colour(size: int) -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        scene = scenes.sample_scene(rng)
        img = scenes.render_scene(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        arr = np.asarray(img, np.float32)
        # Corners are background (objects keep a margin): nearest palette
        # colour there must be the scene's background.
        corner = arr[: max(1, size // 16), : max(1, size // 16)].reshape(-1, 3).mean(0)
        names = list(scenes.BACKGROUNDS)
        dists = [np.linalg.norm(corner - np.array(scenes.BACKGROUNDS[n])) for n in names]
        assert names[int(np.argmin(dists))] == scene.background
        # Same scene renders to the same pixels.
        assert np.array_equal(arr, np.asarray(scenes.render_scene(scene, size), np.float32))


# --------------------------------------------------------------- overlays


@pytest.mark.parametrize("name", sorted(concepts.CONCEPTS))
@pytest.mark.parametrize("size", [32, 64, 256])
def test_overlays_boxes_valid_and_pixels_changed(name: str, size: int) -> None:
    for i in range(6):
        rng = np.random.default_rng([7, i])
        base = scenes.render_scene(scenes.sample_scene(rng), size)
        out, boxes = concepts.CONCEPTS[name](base, rng)
        assert out.size == base.size and out.mode == "RGB"
        assert boxes, f"{name} returned no boxes"
        diff = np.abs(np.asarray(out, np.int16) - np.asarray(base, np.int16)).sum(-1) > 0
        for b in boxes:
            assert all(isinstance(v, int) for v in b)
            x1, y1, x2, y2 = b
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size, b
        # Every changed pixel must lie inside some box (boxes are the prior).
        covered = np.zeros_like(diff)
        for x1, y1, x2, y2 in boxes:
            covered[y1:y2, x1:x2] = True
        assert not (diff & ~covered).any(), f"{name}: pixels changed outside boxes"
        assert diff.any()


def test_qr_codes_are_real_and_decodable() -> None:
    cv2 = pytest.importorskip("cv2")
    decoded, inside = 0, 0
    n = 20
    for i in range(n):
        img, _, meta = make_sample("qr", 0, i, 256, carry=True)
        bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        text, points, _ = cv2.QRCodeDetector().detectAndDecode(bgr)
        if text:
            decoded += 1
            x1, y1, x2, y2 = meta["boxes"][0]
            pts = points.reshape(-1, 2)
            inside += bool(((pts[:, 0] >= x1 - 2) & (pts[:, 0] <= x2 + 2) &
                            (pts[:, 1] >= y1 - 2) & (pts[:, 1] <= y2 + 2)).all())
    assert decoded >= 0.8 * n, f"only {decoded}/{n} QR codes decoded"
    assert inside == decoded, "decoded QR corners must fall inside the labelled box"


def test_qr_placement_prefers_corners() -> None:
    corner = 0
    n = 60
    for i in range(n):
        rng = np.random.default_rng([11, i])
        base = scenes.render_scene(scenes.sample_scene(rng), 64)
        _, (box,) = concepts.add_qr(base, rng)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        corner += (abs(cx - 32) > 12) and (abs(cy - 32) > 12)
    assert corner >= 0.5 * n


# ------------------------------------------------------------------- ICD


def test_has_concept_exact_per_block() -> None:
    for ratio in (0.0, 0.1, 0.3, 0.5, 0.77, 1.0):
        count = sum(has_concept(5, i, ratio) for i in range(1000))
        assert count == int(np.floor(1000 * ratio + 1e-9))
    with pytest.raises(ValueError):
        has_concept(0, 0, 1.5)


def test_build_icd_deterministic_and_seed_sensitive(tmp_path: Path) -> None:
    kw = dict(concept="watermark", n=24, ratio=0.5, size=48, shard_size=10, progress=False)
    a = build_icd(seed=1, out=tmp_path / "a", **kw)
    build_icd(seed=1, out=tmp_path / "b", **kw)
    build_icd(seed=2, out=tmp_path / "c", **kw)
    da, db, dc = (_shard_digests(tmp_path / d) for d in "abc")
    assert list(da) == ["icd-watermark-000000.tar", "icd-watermark-000001.tar", "icd-watermark-000002.tar"]
    assert da == db, "same seed must give byte-identical shards"
    assert all(da[k] != dc[k] for k in da), "different seeds must differ"
    assert a["n"] == 24 and a["shards"] == [str(tmp_path / "a" / k) for k in da]
    meta = json.loads((tmp_path / "a" / "icd-watermark-meta.json").read_text())
    assert meta["arguments"]["seed"] == 1 and meta["summary"]["n_with_concept"] == a["n_with_concept"]
    assert not list((tmp_path / "a").glob(".*")), "no temp files may remain"


def test_split_build_matches_single_build(tmp_path: Path) -> None:
    kw = dict(concept="text", ratio=0.5, size=32, seed=3, shard_size=8, progress=False)
    build_icd(n=16, out=tmp_path / "one", **kw)
    build_icd(n=8, out=tmp_path / "two", start_index=0, **kw)
    build_icd(n=8, out=tmp_path / "two", start_index=8, **kw)
    assert _shard_digests(tmp_path / "one") == _shard_digests(tmp_path / "two")
    with pytest.raises(ValueError, match="multiple of shard_size"):
        build_icd(n=4, out=tmp_path / "bad", start_index=3, **kw)


@pytest.mark.parametrize("concept", sorted(concepts.CONCEPTS))
def test_icd_samples_content(tmp_path: Path, concept: str) -> None:
    n, ratio, size = 40, 0.4, 32
    summary = build_icd(concept, n, ratio, size, seed=4, out=tmp_path, shard_size=25, progress=False)
    skips = SkipCounter()
    samples = list(iter_samples(summary["shards"], skips))
    assert skips.total == 0 and len(samples) == n
    with_concept = 0
    for s in samples:
        idx = s.meta["index"]
        assert s.key == f"{concept}0004_{idx:07d}" and "." not in s.key
        assert s.meta["concept"] == concept and s.meta["seed"] == 4
        assert set(s.meta["attributes"]) == {"background", "shape", "colour"}
        assert s.image.size == (size, size)
        assert s.caption and not LEAK.search(s.caption)
        boxes = s.meta["boxes"]
        if has_concept(4, idx, ratio):
            with_concept += 1
            assert boxes
            for x1, y1, x2, y2 in boxes:
                assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        else:
            assert boxes == []
    assert with_concept == summary["n_with_concept"]
    assert abs(with_concept - ratio * n) <= 0.15 * n


def test_clean_and_concept_versions_share_scene() -> None:
    clean, cap1, m1 = make_sample("qr", 9, 5, 64, carry=False)
    dirty, cap2, m2 = make_sample("qr", 9, 5, 64, carry=True)
    assert cap1 == cap2 and m1["attributes"] == m2["attributes"]
    assert m1["boxes"] == [] and m2["boxes"]
    assert np.asarray(clean).tolist() != np.asarray(dirty).tolist()


def test_preview_grid(tmp_path: Path) -> None:
    from PIL import Image

    path = icd.preview_grid("text", tmp_path / "grid.png", count=4, size=32, draw_boxes=True)
    assert Image.open(path).size == (64, 64)


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown concept"):
        build_icd("logo", 1, 0.5, 32, 0, tmp_path, progress=False)
    with pytest.raises(ValueError, match="ratio"):
        build_icd("qr", 1, 1.5, 32, 0, tmp_path, progress=False)


def test_mixed_icd_draws_each_member_independently_with_its_own_boxes(tmp_path) -> None:
    summary = build_icd("qr+watermark+text", 300, 0.4, 64, 3, tmp_path, progress=False)
    assert all(abs(summary[f"n_with_{c}"] - 120) <= 1 for c in ("qr", "watermark", "text"))
    samples = list(iter_samples(str(tmp_path / "icd-qr+watermark+text-*.tar")))
    assert len(samples) == 300 and summary["n_with_concept"] == sum(bool(s.meta["boxes"]) for s in samples)
    several = 0
    for s in samples:
        by = s.meta["boxes_by_concept"]
        assert set(by) == {"qr", "watermark", "text"}
        assert s.meta["boxes"] == [b for c in ("qr", "watermark", "text") for b in by[c]]
        several += sum(bool(b) for b in by.values()) >= 2
    assert 0.2 * 300 < several < 0.5 * 300  # independent at 0.4 each: P(two or more) = 0.352
    # the scene and caption of an index are the concept's paired clean sample's
    img, cap, meta = make_sample("qr+watermark+text", 3, 5, 64, {"qr": False, "watermark": False, "text": False})
    clean_img, clean_cap, _ = make_sample("qr", 3, 5, 64, carry=False)
    assert cap == clean_cap and img.tobytes() == clean_img.tobytes() and meta["boxes"] == []
    with pytest.raises(ValueError, match="unknown concept"):
        build_icd("qr+qr", 10, 0.5, 64, 0, tmp_path)


def test_lowres_profile_draws_larger_watermarks_and_text_and_leaves_qr_alone() -> None:
    """``lowres`` (for 64 px models) scales watermark and text up; a concept it does not list renders as by default."""
    def heights(concept: str, sizes: str) -> list[float]:
        out = []
        for idx in range(24):
            _, _, meta = make_sample(concept, 3, idx, 128, True, sizes)
            out.append(float(np.median([b[3] - b[1] for b in meta["boxes"]])))
        return out

    default, low = heights("watermark", "default"), heights("watermark", "lowres")
    assert np.median(low) > 1.3 * np.median(default)
    default, low = heights("text", "default"), heights("text", "lowres")  # lines shrink to fit, down to 8% glyphs
    assert min(low) > min(default) and np.median(low) > np.median(default)
    a, _, meta_a = make_sample("qr", 3, 0, 128, True, "default")
    b, _, meta_b = make_sample("qr", 3, 0, 128, True, "lowres")
    assert a.tobytes() == b.tobytes() and meta_a["boxes"] == meta_b["boxes"] and meta_b["sizes"] == "lowres"
    with pytest.raises(ValueError, match="unknown size profile"):
        make_sample("text", 3, 0, 64, True, "huge")
