"""Geometry encoding: boxes -> cells -> location tokens, edge cases."""
from __future__ import annotations

import numpy as np
import pytest

from geomerase.core.geometry import (GeometryConfig, all_loc_tokens, cell_precision_recall, clip_box,
                                     parse_loc_tokens)


def enc(grid=4, thr=0.25, mode="cells"):
    return GeometryConfig(grid=grid, overlap_threshold=thr, mode=mode).build()


def test_box_exactly_one_cell():
    # 64x64 image, 4x4 grid: cell (1, 2) spans x 32..48, y 16..32.
    assert enc().cells_from_boxes([[32, 16, 48, 32]], 64, 64) == [1 * 4 + 2]


def test_box_on_cell_borders_does_not_claim_neighbours():
    # A box whose edges lie exactly on cell borders covers 0% of the neighbouring cells.
    assert enc().cells_from_boxes([[16, 16, 48, 48]], 64, 64) == [5, 6, 9, 10]


def test_threshold_controls_partial_cells():
    box = [[0, 0, 20, 16]]  # covers cell 0 fully and 25% of cell 1
    assert enc(thr=0.25).cells_from_boxes(box, 64, 64) == [0, 1]
    assert enc(thr=0.3).cells_from_boxes(box, 64, 64) == [0]


def test_box_outside_image_is_ignored_and_partly_outside_is_clipped():
    e = enc()
    assert e.cells_from_boxes([[70, 70, 90, 90]], 64, 64) == []
    assert e.cells_from_boxes([[-10, -10, 16, 16]], 64, 64) == [0]
    assert clip_box([70, 70, 90, 90], 64, 64) is None


def test_empty_and_degenerate_boxes():
    e = enc()
    assert e.cells_from_boxes([], 64, 64) == []
    assert e.cells_from_boxes([[10, 10, 10, 30]], 64, 64) == []  # zero width
    with pytest.raises(ValueError):
        e.cells_from_boxes([[1, 2, 3]], 64, 64)
    with pytest.raises(ValueError):
        e.cells_from_boxes([[0, 0, float("nan"), 4]], 64, 64)


def test_tiny_box_keeps_its_best_cell():
    # 3x3 px box: below any threshold of cell area, but the detection must not vanish.
    assert enc().cells_from_boxes([[40, 40, 43, 43]], 64, 64) == [10]


def test_reversed_corners_are_normalised():
    assert enc().cells_from_boxes([[48, 32, 32, 16]], 64, 64) == [6]


def test_non_square_image_and_non_power_of_two_grid():
    e = enc(grid=3, thr=0.5)
    # 90x60 image -> cells 30x20; box covering the middle column entirely.
    assert e.cells_from_boxes([[30, 0, 60, 60]], 90, 60) == [1, 4, 7]


def test_corner_mode_gives_one_ordered_pair_per_box_and_keeps_the_covered_region():
    e = enc(mode="corner")
    assert e.caption_units([[2, 2, 62, 62]], 64, 64) == [(0, 15)]
    # Exclusive bottom-right edge on a border stays in the inner cell.
    assert e.caption_units([[16, 16, 32, 32]], 64, 64) == [(5, 5)]
    # Box order is kept; the tokens are the pairs flattened; the region is the covered cells.
    boxes = [[40, 40, 60, 60], [0, 0, 30, 14]]
    assert e.caption_units(boxes, 64, 64) == [(10, 15), (0, 1)]
    assert e.tokens_from_boxes(boxes, 64, 64) == ["<l10>", "<l15>", "<l0>", "<l1>"]
    assert e.cells_from_boxes(boxes, 64, 64) == enc().cells_from_boxes(boxes, 64, 64) == [0, 1, 10, 11, 14, 15]


def test_tokens_and_parsing_round_trip():
    e = enc()
    toks = e.tokens_from_boxes([[0, 48, 16, 64]], 64, 64)
    assert toks == ["<l12>"]
    assert parse_loc_tokens("a b, qr code <l12> <l3>") == [12, 3]
    assert all_loc_tokens(2) == ["<l0>", "<l1>", "<l2>", "<l3>"]


def test_cell_mask_and_box():
    e = enc()
    m = e.cell_mask([0, 15])
    assert m.shape == (4, 4) and m[0, 0] and m[3, 3] and m.sum() == 2
    assert e.cell_box(6, 64, 64) == (32, 16, 48, 32)
    with pytest.raises(ValueError):
        e.cell_mask([16])


def test_precision_recall():
    pr = cell_precision_recall([[1, 2], [], [3]], [[1], [], [4]])
    assert pr["tp"] == 1 and pr["fp"] == 2 and pr["fn"] == 1
    assert pr["precision"] == pytest.approx(1 / 3) and pr["recall"] == pytest.approx(0.5)
    assert pr["image_accuracy"] == pytest.approx(1.0)


def test_config_validation():
    with pytest.raises(ValueError):
        GeometryConfig(grid=0).build()
    with pytest.raises(ValueError):
        GeometryConfig(overlap_threshold=0).build()


def _single_box_reference(box, width, height, grid):
    """Per-box coverage as computed before union coverage: overlap_y * overlap_x / cell area."""
    xs, ys = np.linspace(0.0, width, grid + 1), np.linspace(0.0, height, grid + 1)
    x1, y1, x2, y2 = clip_box(box, width, height)
    ox = np.clip(np.minimum(xs[1:], x2) - np.maximum(xs[:-1], x1), 0.0, None)
    oy = np.clip(np.minimum(ys[1:], y2) - np.maximum(ys[:-1], y1), 0.0, None)
    return np.outer(oy, ox) / ((xs[1] - xs[0]) * (ys[1] - ys[0]))


def test_single_box_coverage_is_bit_identical_to_per_box_coverage():
    rng = np.random.default_rng(0)
    for grid, (w, h) in [(4, (64, 64)), (3, (90, 60)), (7, (513, 301)), (10, (512, 512))]:
        for _ in range(50):
            box = rng.uniform([-20, -20, -20, -20], [w + 20, h + 20, w + 20, h + 20]).tolist()
            if clip_box(box, w, h) is None:
                continue
            got = enc(grid=grid).coverage([box], w, h)
            assert np.array_equal(got, _single_box_reference(box, w, h, grid)), (grid, box)


def test_two_partial_boxes_claim_a_cell_together():
    # Cell 0 spans 0..16 x 0..16; each box covers a 16x2.4 strip (15%), together 30%.
    e = enc(thr=0.2)
    a, b = [0, 0, 16, 2.4], [0, 8, 16, 10.4]
    assert e.coverage([a], 64, 64)[0, 0] == pytest.approx(0.15)
    assert e.coverage([a, b], 64, 64)[0, 0] == pytest.approx(0.30)
    assert 0 in e.cells_from_boxes([a, b], 64, 64)
    # Two boxes each covering one half of the cell claim it in full.
    assert e.coverage([[0, 0, 8, 16], [8, 0, 16, 16]], 64, 64)[0, 0] == pytest.approx(1.0)


def test_overlapping_boxes_are_not_double_counted():
    e = enc(thr=0.2)
    # Identical boxes: same coverage as one. Overlapping 16x3.2 strips (20% each) sharing 16x1.6: union 30%.
    one = e.coverage([[0, 0, 16, 3.2]], 64, 64)
    assert np.array_equal(e.coverage([[0, 0, 16, 3.2]] * 3, 64, 64), one)
    assert e.coverage([[0, 0, 16, 3.2], [0, 1.6, 16, 4.8]], 64, 64)[0, 0] == pytest.approx(0.30)
    # A box inside another adds nothing; coverage never exceeds 1.
    cov = e.coverage([[0, 0, 64, 64], [5, 5, 40, 40]], 64, 64)
    assert np.allclose(cov, 1.0)
