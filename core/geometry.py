"""Geometry encoding: detections in pixels -> grid cells -> location tokens.

The image is split into a ``G x G`` grid; cell ``(row, col)`` is named by the
location token ``<l{row*G+col}>``. A detection covers a cell when the share of the
*cell's* area inside the union of the boxes reaches ``overlap_threshold`` (so a thin box that
grazes a cell does not claim it, while a large box claims every cell it fills).
Two encodings:

* ``cells``  — every covered cell (Geom-Erasing's encoding).
* ``corner`` — per box, the ordered pair (top-left cell, bottom-right cell) (GeoDiffusion's
  two-token encoding).

The encoding decides only the caption's location tokens (:meth:`GridEncoder.caption_units`):
the *covered cells* (:meth:`GridEncoder.cells_from_boxes`) are the region in both, which the
re-weighting masks and the annotation-quality metrics use. A caption unit is one cell (``cells``)
or one ``(top-left, bottom-right)`` pair (``corner``); captions shuffle and trim whole units, so
a pair is never split or reordered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

CLIP_MAX_LENGTH = 77
"""Tokens in CLIP's text context (start and end tokens included): every caption and negative prompt fits it."""

LOC_TOKEN_RE = re.compile(r"<l(\d+)>")

CellUnit = int | tuple[int, int]
"""One caption unit: a flat cell index, or a ``(top-left, bottom-right)`` corner pair."""


def loc_token(index: int) -> str:
    """The location token for flat cell ``index`` (``row * G + col``)."""
    return f"<l{index}>"


def all_loc_tokens(grid: int) -> list[str]:
    """``["<l0>", ..., "<l{G*G-1}>"]``."""
    return [loc_token(i) for i in range(grid * grid)]


def unit_cells(units: Iterable[CellUnit]) -> list[int]:
    """The flat cell indices of caption units, in order (a pair gives its two cells)."""
    out: list[int] = []
    for u in units:
        out.extend(u if isinstance(u, (tuple, list)) else (u,))
    return out


def parse_loc_tokens(text: str) -> list[int]:
    """Cell indices named in ``text``, in order of appearance."""
    return [int(m) for m in LOC_TOKEN_RE.findall(text)]


@dataclass
class GeometryConfig:
    grid: int = 4
    """G: the image is split into G x G cells, one location token each."""
    overlap_threshold: float = 0.2
    """Share of a cell's area that a box must cover for the cell to count (0 < t <= 1)."""
    mode: Literal["cells", "corner"] = "cells"
    """Caption location tokens. 'cells': every covered cell; 'corner': per box, its top-left and
    bottom-right cells as an ordered pair. The covered cells are the region in both modes."""

    def validate(self) -> None:
        if self.grid < 1:
            raise ValueError(f"geometry.grid must be >= 1, got {self.grid}")
        if not 0.0 < self.overlap_threshold <= 1.0:
            raise ValueError(f"geometry.overlap_threshold must be in (0, 1], got {self.overlap_threshold}")

    def build(self) -> "GridEncoder":
        self.validate()
        return GridEncoder(self)


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip ``[x1, y1, x2, y2]`` to the image; None when nothing of it is inside.

    Reversed corners are normalised rather than rejected: detectors disagree on
    conventions, and a box is a set of pixels either way.
    """
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise ValueError(f"box has non-finite coordinates: {list(box)}")
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, float(width)), min(y2, float(height))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


class GridEncoder:
    """Maps pixel boxes on a ``width x height`` image to cell indices of a G x G grid."""

    def __init__(self, cfg: GeometryConfig):
        self.cfg = cfg
        self.grid = cfg.grid

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    def coverage(self, boxes: Iterable[Sequence[float]], width: int, height: int) -> np.ndarray:
        """``(G, G)`` float64: the exact share of each cell's area covered by the union of the boxes.

        Overlapping boxes are not double-counted. The union is measured exactly by
        coordinate compression: the cell edges and box edges split the image into
        elementary rectangles, each wholly inside or outside every box and cell.
        A single box gives ``overlap_x * overlap_y / cell_area`` per cell.
        """
        g = self.grid
        xs = np.linspace(0.0, float(width), g + 1)
        ys = np.linspace(0.0, float(height), g + 1)
        cell_area = (xs[1] - xs[0]) * (ys[1] - ys[0])
        cov = np.zeros((g, g), dtype=np.float64)
        rects = [r for r in (clip_box(box, width, height) for box in boxes) if r is not None]
        if not rects:
            return cov
        r = np.asarray(rects, dtype=np.float64)
        ex = np.unique(np.concatenate([xs, r[:, 0], r[:, 2]]))
        ey = np.unique(np.concatenate([ys, r[:, 1], r[:, 3]]))
        inside = np.zeros((len(ey) - 1, len(ex) - 1), dtype=bool)
        for x1, y1, x2, y2 in rects:
            rs, re_ = np.searchsorted(ey, [y1, y2])
            cs, ce = np.searchsorted(ex, [x1, x2])
            inside[rs:re_, cs:ce] = True
        area = np.where(inside, np.outer(np.diff(ey), np.diff(ex)), 0.0)
        rows = np.minimum(np.searchsorted(ys, ey[:-1], side="right") - 1, g - 1)
        cols = np.minimum(np.searchsorted(xs, ex[:-1], side="right") - 1, g - 1)
        np.add.at(cov, (rows[:, None], cols[None, :]), area)
        return cov / cell_area

    def cells_from_boxes(self, boxes: Iterable[Sequence[float]], width: int, height: int) -> list[int]:
        """Sorted flat indices ``row*G+col`` of the cells the boxes cover (either mode)."""
        boxes = list(boxes)
        cov = self.coverage(boxes, width, height)
        # A tiny box that covers no cell up to the threshold still exists: keep the
        # cell holding most of it rather than losing the detection.
        cells = set(np.flatnonzero(cov.reshape(-1) >= self.cfg.overlap_threshold - 1e-9).tolist())
        for box in boxes:
            clipped = clip_box(box, width, height)
            if clipped is None:
                continue
            single = self.coverage([clipped], width, height)
            if not (single.reshape(-1) >= self.cfg.overlap_threshold - 1e-9).any():
                cells.add(int(single.reshape(-1).argmax()))
        return sorted(cells)

    def _cell_of_point(self, x: float, y: float, width: int, height: int) -> int:
        g = self.grid
        col = min(int(x / width * g), g - 1)
        row = min(int(y / height * g), g - 1)
        return row * g + col

    def caption_units(self, boxes: Iterable[Sequence[float]], width: int, height: int) -> list[CellUnit]:
        """The caption's location units: the covered cells (``cells``) or one corner pair per box
        (``corner``, in box order)."""
        boxes = list(boxes)
        if self.cfg.mode == "corner":
            return list(self.corner_pairs(boxes, width, height))
        return list(self.cells_from_boxes(boxes, width, height))

    def corner_pairs(self, boxes: Iterable[Sequence[float]], width: int, height: int) -> list[tuple[int, int]]:
        """``(top-left cell, bottom-right cell)`` of each box inside the image, in box order."""
        out: list[tuple[int, int]] = []
        for box in boxes:
            clipped = clip_box(box, width, height)
            if clipped is None:
                continue
            x1, y1, x2, y2 = clipped
            # The bottom-right corner is exclusive: step just inside the box.
            eps = 1e-6
            out.append((self._cell_of_point(x1, y1, width, height),
                        self._cell_of_point(max(x2 - eps, x1), max(y2 - eps, y1), width, height)))
        return out

    def tokens_from_boxes(self, boxes: Iterable[Sequence[float]], width: int, height: int) -> list[str]:
        """The caption's location tokens for ``boxes`` (see :meth:`caption_units`)."""
        return [loc_token(i) for i in unit_cells(self.caption_units(boxes, width, height))]

    def cell_mask(self, cells: Iterable[int]) -> np.ndarray:
        """``(G, G)`` bool mask with the given flat cells set."""
        mask = np.zeros(self.num_cells, dtype=bool)
        for c in cells:
            if not 0 <= c < self.num_cells:
                raise ValueError(f"cell index {c} outside a {self.grid}x{self.grid} grid")
            mask[c] = True
        return mask.reshape(self.grid, self.grid)

    def cell_box(self, index: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel box ``[x1, y1, x2, y2)`` of flat cell ``index``."""
        g = self.grid
        row, col = divmod(index, g)
        xs = np.linspace(0, width, g + 1).round().astype(int)
        ys = np.linspace(0, height, g + 1).round().astype(int)
        return int(xs[col]), int(ys[row]), int(xs[col + 1]), int(ys[row + 1])


def cell_precision_recall(pred: Sequence[Iterable[int]], true: Sequence[Iterable[int]]) -> dict[str, float]:
    """Micro-averaged cell-level precision/recall/F1 over a list of images.

    Images with no true and no predicted cells contribute nothing; the image-level
    detection accuracy (concept present or not) is reported alongside.
    """
    tp = fp = fn = 0
    img_correct = 0
    for p, t in zip(pred, true, strict=True):
        p, t = set(p), set(t)
        tp += len(p & t)
        fp += len(p - t)
        fn += len(t - p)
        img_correct += int(bool(p) == bool(t))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pred), 1)
    return {"precision": precision, "recall": recall, "f1": f1, "image_accuracy": img_correct / n,
            "tp": tp, "fp": fp, "fn": fn, "n_images": len(pred)}
