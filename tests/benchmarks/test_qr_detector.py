"""The QR benchmark on real photographs: codes drawn where their boxes say, a seeded set, and the scoring
(detector alone and annotated shards) counting detections on clean images as false cells."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from geomerase.benchmarks.qr_detector import Placement, build_set, draw_qr, evaluate
from geomerase.core.detectors import build_detector
from geomerase.core.geometry import GeometryConfig


def _square(x: float, y: float, side: float, quiet: int = 4) -> Placement:
    corners = ((x, y), (x + side, y), (x + side, y + side), (x, y + side))
    return Placement("https://example.org/q", "M", quiet, side, (0, 0, 0), (255, 255, 255), 0.0, "none", corners)


def _jpeg(img: Image.Image) -> tuple[Image.Image, bytes]:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), buf.getvalue()


def test_a_drawn_code_lies_in_its_box_and_maps_to_the_cells_it_covers():
    img = Image.new("RGB", (256, 192), (120, 140, 90))
    out, boxes = draw_qr(img, _square(10, 20, 100))
    assert boxes == [[10.0, 20.0, 110.0, 120.0]]
    a, before = np.asarray(out).astype(int), np.asarray(img).astype(int)
    changed = np.nonzero(np.abs(a - before).sum(-1) > 0)
    assert changed[1].min() >= 9 and changed[1].max() <= 110 and changed[0].min() >= 19 and changed[0].max() <= 120
    inner = a[20 + 10:120 - 10, 10 + 10:110 - 10].mean(-1)  # inside the 4-module quiet zone: two-tone modules
    assert (inner < 40).mean() > 0.25 and (inner > 215).mean() > 0.25
    # Grid 4 on 256 x 192: cells of 64 x 48 px; the box covers all of cell 0 and >= 20% of cells 1, 4, 5, 8, 9.
    assert GeometryConfig(grid=4).build().cells_from_boxes(boxes, 256, 192) == [0, 1, 4, 5, 8, 9]
    # Partly beyond the right edge: the box is clipped to the image.
    _, clipped = draw_qr(img, _square(200, 50, 80))
    assert clipped == [[200.0, 50.0, 256.0, 130.0]]
    outside, none = draw_qr(img, _square(300, 50, 40))  # wholly beyond the edge: nothing drawn, no box
    assert none == [] and np.array_equal(np.asarray(outside), np.asarray(img))


def test_the_set_is_seeded_half_with_codes_jpeg_in_range():
    pytest.importorskip("skimage")
    items, encoded, info = build_set(8, seed=3, size=128)
    again = build_set(8, seed=3, size=128)
    assert encoded == again[1] and [b for _, b in items] == [b for _, b in again[0]]
    assert [im.size for im, _ in items] == [(128, 96), (96, 128)] * 4
    assert [bool(b) for _, b in items] == [True, True, False, False] * 2
    for (im, boxes), rec, jpg in zip(items, info, encoded):
        assert jpg[:2] == b"\xff\xd8" and 70 <= rec["jpeg_quality"] <= 95
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height
        if boxes:
            assert 0.06 * 128 <= rec["side"] <= 0.30 * 128 and rec["quiet"] in (1, 2, 4) and rec["payload_chars"] >= 4


def test_detections_on_clean_images_are_false_cells_alike_alone_and_annotated(tmp_path):
    bg = Image.new("RGB", (256, 192), (150, 120, 100))
    code, boxes = draw_qr(bg, _square(40, 30, 120))
    items, encoded = [], []
    for img, b in [(code, boxes), (code, [])] + [(bg, [])] * 6:  # the same code, then without its box
        dec, jpg = _jpeg(img)
        items.append((dec, b))
        encoded.append(jpg)
    alone, local = evaluate(items, encoded, tmp_path, engines=("local",), shard_size=4)
    enc = GeometryConfig(grid=4).build()
    truth = set(enc.cells_from_boxes(boxes, 256, 192))
    found = build_detector("qr", "qr").detect(items[0][0])
    pred = set(enc.cells_from_boxes([d.box for d in found], 256, 192))
    assert len(found) == 1 and pred and pred <= truth  # the finder corners lie inside the quiet zone's box
    for row in (alone, local):
        # the unlabelled copy's cells are all false; the labelled one misses only quiet-zone cells
        assert (row["tp"], row["fp"], row["fn"]) == (len(pred), len(pred), len(truth - pred)), row
        assert row["cell_precision"] == 0.5 and row["image_precision"] == 0.5 and row["image_recall"] == 1.0
        assert row["images_per_cpu_s"] > 0
    assert alone["engine"] == "detector only" and local["engine"] == "local" and local["images"] == 8


def test_the_default_detector_finds_a_small_module_code_the_classic_native_pass_misses():
    """A 33-module code (quiet zone 2) drawn 62 px wide, 1.9 px modules, rotated 8 degrees, on a noisy
    gradient, JPEG 95: the Aruco pass at 1.5x locates it; the classic detector alone at the native
    size (the settings before the Aruco pass) finds nothing. Neither flags the backdrop alone."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:384, 0:512] / 512
    base = np.stack([110 + 90 * x, 140 + 50 * np.sin(6 * y), 120 - 60 * x * y], -1) + rng.normal(0, 6, (384, 512, 3))
    backdrop = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    t = np.deg2rad(8.0)
    corners = (np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * 62
               @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T + [300, 200])
    p = Placement("https://example.org/menu/table/12", "M", 2, 62.0, (20, 20, 20), (235, 235, 235), 8.0, "none",
                  tuple(map(tuple, corners)))
    drawn, boxes = draw_qr(backdrop, p)
    img, _ = _jpeg(drawn)
    new = build_detector("qr", "qr")
    old = build_detector("qr", "qr", engine="classic", fallback="none", upscale="1")
    found = new.detect(img)
    assert len(found) == 1, found
    x1, y1, x2, y2 = found[0].box
    assert boxes[0][0] <= x1 < x2 <= boxes[0][2] and boxes[0][1] <= y1 < y2 <= boxes[0][3]
    assert old.detect(img) == []
    clean, _ = _jpeg(backdrop)
    assert new.detect(clean) == [] and old.detect(clean) == []
