"""Erasing metrics and the pictures that go with them.

* Implicit-concept ratio (ICR): share of generated images in which a scorer finds
  the concept, with a Wilson 95% interval (64-128 samples leave several points of
  uncertainty, which a report must show).
* Prompt fidelity: share of generated images whose background colour / main shape,
  as read by the attribute classifier, matches the prompt's.
* Sample grids with the scorer's flagged cells outlined, so a person can check the
  scorer by eye; ICR bar charts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``k/n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Rounding can put a bound a hair inside p at k=0 or k=n; the interval always contains p.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def icr(flags: Sequence[bool]) -> dict[str, float]:
    """ICR of per-image flags with its interval."""
    n = len(flags)
    k = int(sum(bool(f) for f in flags))
    lo, hi = wilson_interval(k, n)
    return {"icr": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}


def clearly_below(a: dict, b: dict) -> bool:
    """Whether ICR ``a`` is below ICR ``b`` beyond the sampling noise: their 95% Wilson intervals
    (:func:`icr`) do not overlap (``a``'s upper bound under ``b``'s lower bound). Conservative: a
    difference whose intervals touch is not counted as one."""
    return a["ci95"][1] < b["ci95"][0]


def difference_interval(a: dict, b: dict) -> dict[str, float | list[float]]:
    """95% interval of the ICR difference ``a - b`` (Newcombe 1998, method 10: the hybrid score interval
    built from the two Wilson intervals of :func:`icr`). When it lies below 0 the difference is beyond
    the noise at the 5% level; :func:`clearly_below` (disjoint intervals) is the stricter test."""
    pa, pb = a["icr"], b["icr"]
    (la, ua), (lb, ub) = a["ci95"], b["ci95"]
    d = pa - pb
    return {"diff": d, "ci95": [d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2),
                                d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)]}


def binary_pr(pred: Sequence[bool], true: Sequence[bool]) -> dict[str, float]:
    """Image-level precision/recall/accuracy of a detector."""
    p = np.asarray(pred, bool)
    t = np.asarray(true, bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "accuracy": float((p == t).mean()) if len(p) else float("nan"), "n": int(len(p))}


def fidelity(pred_bg: torch.Tensor, pred_shape: torch.Tensor, want_bg: torch.Tensor,
             want_shape: torch.Tensor) -> dict[str, float]:
    """Attribute accuracies; ``fidelity`` is the mean of background and shape accuracy."""
    bg = (pred_bg == want_bg).float().mean().item()
    sh = (pred_shape == want_shape).float().mean().item()
    return {"fidelity": (bg + sh) / 2, "background": bg, "shape": sh}


def fidelity_chance(num_backgrounds: int, num_shapes: int) -> float:
    """Fidelity of guessing uniformly at random."""
    return (1 / num_backgrounds + 1 / num_shapes) / 2


def sample_grid(images_u8: torch.Tensor, path: str | Path, flagged_cells: Sequence[Sequence[int]] | None = None,
                grid: int = 4, cols: int = 16, scale: int = 3, title: str | None = None) -> Path:
    """Save ``(N,3,R,R)`` uint8 images as a PNG grid.

    Images the scorer flagged get a red frame and their flagged cells a thin red
    outline; unflagged images get a green frame.
    """
    n, _, r, _ = images_u8.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    tile = r * scale
    pad = 2
    head = 14 if title else 0
    canvas = Image.new("RGB", (cols * (tile + 2 * pad), rows * (tile + 2 * pad) + head), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill=(0, 0, 0))
    arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        x0 = (i % cols) * (tile + 2 * pad)
        y0 = (i // cols) * (tile + 2 * pad) + head
        img = Image.fromarray(arr[i]).resize((tile, tile), Image.NEAREST)
        cells = list(flagged_cells[i]) if flagged_cells is not None else []
        frame = (220, 30, 30) if cells else (60, 170, 60)
        if flagged_cells is not None:
            draw.rectangle([x0, y0, x0 + tile + 2 * pad - 1, y0 + tile + 2 * pad - 1], fill=frame)
        canvas.paste(img, (x0 + pad, y0 + pad))
        c = tile / grid
        for cell in cells:
            rr, cc = divmod(cell, grid)
            draw.rectangle([x0 + pad + cc * c, y0 + pad + rr * c, x0 + pad + (cc + 1) * c - 1,
                            y0 + pad + (rr + 1) * c - 1], outline=(255, 40, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def icr_bar_chart(values: dict[str, dict], path: str | Path, title: str = "implicit-concept ratio",
                  highlight: set[str] | None = None) -> Path:
    """Bar chart of ICR per arm with 95% intervals (``values[arm] = icr(...)`` dicts).

    Arms in ``highlight`` (default: names containing "geom") are drawn green, the rest red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(values)
    ys = [values[a]["icr"] for a in arms]
    # Wilson bounds can sit a hair inside the point estimate at k=0 or k=n.
    lo = [max(0.0, values[a]["icr"] - values[a]["ci95"][0]) for a in arms]
    hi = [max(0.0, values[a]["ci95"][1] - values[a]["icr"]) for a in arms]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(arms), 3.4), dpi=110)
    green = highlight if highlight is not None else {a for a in arms if "geom" in a}
    colours = ["#27ae60" if a in green else "#c0392b" for a in arms]
    ax.bar(range(len(arms)), ys, yerr=[lo, hi], color=colours, capsize=3)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=30, ha="right")
    ax.set_ylabel("ICR (share of images with the concept)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
