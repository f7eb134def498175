"""The in-memory loader: a horizontal flip moves the concept's cells, masks and position words with
the pixels."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from geomerase.data.loader import InMemoryDataset, MemorySource, annotated_cells, mirror_caption, mirror_cells
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

    def captions(caption, concepts, rng: random.Random) -> str:
        seen.append((caption, list(concepts[0][1])))
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


@pytest.mark.parametrize("annotated, model_grid, cells", [(4, 3, [0, 13]), (3, 4, [0, 4])])
def test_annotation_grid_other_than_the_models_is_an_error(tmp_path, annotated, model_grid, cells):
    # Cell 13 of a 4x4 grid does not exist at 3x3; cell 4 of a 3x3 grid is another place at 4x4.
    meta = {"caption_clean": "a photo", "annotation": {"concept_name": "qr code", "cells": cells,
                                                       "grid": annotated}}
    shard = tmp_path / "s.tar"
    write_shard(shard, [{"__key__": "k0", "png": Image.new("RGB", (16, 16)), "txt": "a photo", "json": meta}])
    ds = InMemoryDataset(str(shard), 16)
    with pytest.raises(ValueError, match=rf"s\.tar sample 'k0': annotated at grid {annotated}, but the model's "
                                         rf"grid is {model_grid}") as err:
        MemorySource(ds, model_grid, lambda c, found, rng: c, batch_size=1, seed=0)
    assert "\n" not in str(err.value)
    assert MemorySource(ds, annotated, lambda c, found, rng: c, batch_size=1, seed=0).masks[0].sum() == len(cells)


def test_annotated_cells_reads_cells_and_checks_the_grid(tmp_path):
    recs = [{"__key__": f"k{i}", "png": Image.new("RGB", (8, 8)), "txt": "a photo", "json": meta}
            for i, meta in enumerate([{"annotation": {"concept_name": "qr code", "cells": [5, 1], "grid": 4}},
                                      {"annotation": {"concept_name": "qr code", "cells": [], "grid": 4}}, {}])]
    write_shard(tmp_path / "s.tar", recs)
    assert annotated_cells(str(tmp_path / "*.tar")) == [[5, 1]]
    assert annotated_cells(str(tmp_path / "*.tar"), 4) == [[5, 1]]
    with pytest.raises(ValueError, match=r"sample 'k0': annotated at grid 4, but the model's grid is 3"):
        annotated_cells(str(tmp_path / "*.tar"), 3)


def test_several_concepts_reach_the_caption_builder_each_with_its_cells(tmp_path):
    """A multi-detector annotation (``concepts``, no top-level ``concept_name``) trains as geom
    with one phrase per concept, and its masks are the union of the concept cells."""
    from geomerase.core.captions import CaptionConfig
    from geomerase.core.tokenizer import build_tokenizer

    ann = {"grid": 4, "cells": [3, 4, 12], "concepts": {
        "watermark": {"concept_name": "watermark", "cells": [3, 4]},
        "text": {"concept_name": "text", "cells": [12]},
        "qr": {"concept_name": "qr code", "cells": []}}}
    write_shard(tmp_path / "s.tar", [{"__key__": "k0", "png": Image.new("RGB", (16, 16)), "txt": "a photo",
                                      "json": {"caption_clean": "a photo", "annotation": ann}}])
    ds = InMemoryDataset(str(tmp_path / "s.tar"), 16)
    assert ds.records[0].concepts == [("text", [12]), ("watermark", [3, 4])]  # concept-key order
    builder = CaptionConfig(mode="geom", dropout=0.0).build(build_tokenizer(4))
    src = MemorySource(ds, 4, builder, batch_size=1, seed=0)
    b = src.batch(0)
    assert b.captions == ["a photo, text <l12>, watermark <l3> <l4>"]
    assert sorted(torch.nonzero(b.masks[0].flatten()).flatten().tolist()) == [3, 4, 12]
