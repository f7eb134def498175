"""The in-memory loader: a horizontal flip moves the concept's cells, masks and position words with
the pixels."""
import random

import numpy as np
import torch
from PIL import Image

from geomerase.data.loader import InMemoryDataset, MemorySource, mirror_caption, mirror_cells
from geomerase.data.shards import write_shard


def test_mirror_cells_and_caption():
    assert mirror_cells([0, 5, 7, 15], 4) == [3, 6, 4, 12]
    assert mirror_cells(mirror_cells([1, 9, 14], 4), 4) == [1, 9, 14]
    assert mirror_caption("a red circle on the left, a blue ring in the top right") == \
        "a red circle on the right, a blue ring in the top left"
    assert mirror_caption("leftover bright") == "leftover bright"


def test_hflip_moves_cells_masks_and_words_with_the_image(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[0:4, 0:4] = 255  # the "concept" in the top-left cell of a 4x4 grid
    meta = {"annotation": {"concept_name": "qr code", "cells": [0], "grid": 4}}
    write_shard(tmp_path / "s.tar", [{"__key__": "k0", "png": Image.fromarray(img),
                                      "txt": "a red circle on the left", "json": meta}])
    ds = InMemoryDataset(str(tmp_path / "s.tar"), 16)
    seen: list[tuple] = []

    def captions(caption, concept, cells, rng: random.Random) -> str:
        seen.append((caption, list(cells)))
        return caption

    src = MemorySource(ds, 4, captions, batch_size=1, seed=0, hflip=True)
    flipped = 0
    for step in range(16):
        b = src.batch(step)
        caption, cells = seen[-1]
        bright = b.images[0].float().mean(0) > 128
        on_right = bool(bright[0:4, 12:16].all())
        if on_right:
            flipped += 1
            assert cells == [3] and caption == "a red circle on the right"
            assert b.masks[0, 0, 3] and b.masks[0].sum() == 1
        else:
            assert bool(bright[0:4, 0:4].all()) and cells == [0] and caption == "a red circle on the left"
            assert b.masks[0, 0, 0] and b.masks[0].sum() == 1
    assert 0 < flipped < 16
    assert torch.equal(ds.images[0], torch.from_numpy(img).permute(2, 0, 1))  # the dataset itself unchanged
