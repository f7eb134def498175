"""Geometry encoding: boxes -> cells -> location tokens, edge cases."""
from __future__ import annotations

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


def test_corner_mode_gives_two_cells_per_box():
    e = enc(mode="corner")
    assert e.cells_from_boxes([[2, 2, 62, 62]], 64, 64) == [0, 15]
    # Exclusive bottom-right edge on a border stays in the inner cell.
    assert e.cells_from_boxes([[16, 16, 32, 32]], 64, 64) == [5, 5]


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
