"""Streaming loaders: shard split across ranks/streams, deterministic batches, exact resume, DALI == webdataset."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from geomerase.data.loader import DataConfig
from geomerase.data.shards import encode_png, write_shard
from geomerase.data.sources import StreamSource
from geomerase.data.webdataset_loader import ShuffleBuffer, stream_shards


def _caption(caption, concepts, rng):
    found = ";".join(f"{name}|{','.join(map(str, cells))}" for name, cells in concepts) or "None|"
    return f"{caption}|{found}|{rng.random():.6f}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards x 10 samples of 32 px gradient images; sample i covers cell i % 16."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for s in range(8):
        recs = []
        for j in range(10):
            i = s * 10 + j
            # Smooth images: resampling filters (PIL box vs DALI linear) then differ by a level or two.
            yy, xx = np.mgrid[0:32, 0:32]
            base = rng.integers(0, 128, size=3)
            arr = (base + 3 * yy[..., None] + 2 * xx[..., None] * (1 + (i % 3))).clip(0, 255).astype(np.uint8)
            meta = {"caption_clean": f"sample {i}", "annotation": {"cells": [i % 16], "concept_name": "qr code",
                                                                   "grid": 4}}
            recs.append({"__key__": f"k{i:04d}", "png": encode_png(Image.fromarray(arr)), "json": meta,
                         "txt": f"sample {i}"})
        write_shard(root / f"s{s:02d}.tar", recs)
    return root


def _source(shards, loader="webdataset", rank=0, world=1, workers=0, batch=8, buffer=16, seed=3):
    cfg = DataConfig(shards=str(shards / "*.tar"), batch_size=batch, loader=loader, workers=workers,
                     shuffle_buffer=buffer, dali_threads=1)
    return StreamSource(cfg, 16, 4, _caption, seed, rank, world)


def _ids(b):
    return [c.split("|")[0] for c in b.captions]


def test_shards_split_across_ranks_and_streams_without_overlap():
    names = [f"s{i}" for i in range(12)]
    parts = [stream_shards(names, r, 2, s, 3) for r in range(2) for s in range(3)]
    flat = [n for p in parts for n in p]
    assert sorted(flat) == sorted(names) and len(set(flat)) == 12


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(ShuffleBuffer(5, random.Random(1))(iter(range(40))))
    b = list(ShuffleBuffer(5, random.Random(1))(iter(range(40))))
    assert a == b and sorted(a) == list(range(40)) and a != list(range(40))


def test_ranks_see_disjoint_samples_and_batches_are_deterministic(shards):
    r0, r1 = _source(shards, rank=0, world=2, batch=8), _source(shards, rank=1, world=2, batch=8)
    seen0 = {i for step in range(5) for i in _ids(r0.batch(step, (0, 2)))}
    seen1 = {i for step in range(5) for i in _ids(r1.batch(step, (1, 2)))}
    assert not seen0 & seen1
    again = _source(shards, rank=0, world=2, batch=8)
    a = [again.batch(step, (0, 2)) for step in range(3)]
    r0b = _source(shards, rank=0, world=2, batch=8)
    b = [r0b.batch(step, (0, 2)) for step in range(3)]
    for x, y in zip(a, b):
        assert x.captions == y.captions and torch.equal(x.images, y.images) and torch.equal(x.masks, y.masks)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_gives_the_same_next_batches(shards, workers):
    full = _source(shards, workers=workers)
    ref = [full.batch(step, (0, 1)) for step in range(9)]  # crosses an epoch boundary (80 samples / 8)
    resumed = _source(shards, workers=workers)
    resumed.load_state_dict(5, resumed.state_dict(5))
    for step in range(5, 9):
        b = resumed.batch(step, (0, 1))
        assert b.captions == ref[step].captions and torch.equal(b.images, ref[step].images)
    # Masks follow the annotation cells.
    b = ref[0]
    for caption, mask in zip(b.captions, b.masks):
        cell = int(caption.split("|")[2])
        assert mask.view(-1)[cell] and mask.sum() == 1


def test_too_few_shards_for_the_streams_is_an_error(shards):
    with pytest.raises(ValueError, match="shard"):
        _source(shards, rank=0, world=4, workers=3)


def test_dali_gives_the_same_batches_as_webdataset(shards):
    pytest.importorskip("nvidia.dali")
    py, dali = _source(shards, workers=2), _source(shards, loader="dali", workers=2)
    ref = []
    for step in range(4):
        a, b = py.batch(step, (0, 1)), dali.batch(step, (0, 1))
        ref.append(b)
        assert a.captions == b.captions
        assert torch.equal(a.masks, b.masks)
        diff = (a.images.float() - b.images.float()).abs().mean().item()
        assert diff < 3.0, diff  # resampling differences only
    resumed = _source(shards, loader="dali", workers=2)
    resumed.load_state_dict(3, resumed.state_dict(3))
    b = resumed.batch(3, (0, 1))
    assert b.captions == ref[3].captions and torch.equal(b.images, ref[3].images)


def test_annotation_grid_other_than_the_models_is_an_error(tmp_path):
    # Annotated at grid 4 (cell 13 = <l13>, outside a 3x3 grid), read at grid 3: no silent drop of the cell.
    meta = {"caption_clean": "a photo", "annotation": {"cells": [13], "concept_name": "qr code", "grid": 4}}
    write_shard(tmp_path / "s00.tar", [{"__key__": "k0", "png": encode_png(Image.new("RGB", (16, 16))),
                                        "json": meta, "txt": "a photo"}])
    cfg = DataConfig(shards=str(tmp_path / "*.tar"), batch_size=1, loader="webdataset", workers=0, shuffle_buffer=1)
    with pytest.raises(ValueError, match=r"s00\.tar sample 'k0': annotated at grid 4, but the model's grid is 3"):
        StreamSource(cfg, 16, 3, _caption, 0, 0, 1).batch(0, (0, 1))
    b = StreamSource(cfg, 16, 4, _caption, 0, 0, 1).batch(0, (0, 1))
    assert b.masks[0].flatten().nonzero().flatten().tolist() == [13]


@pytest.mark.parametrize("loader", ["webdataset", "dali"])
def test_jpg_and_webp_shards_with_img2dataset_json_stream(tmp_path, loader):
    # img2dataset's json has no annotation: the caption is the sample's own and the masks are empty.
    import io

    if loader == "dali":
        pytest.importorskip("nvidia.dali")

    for s, fmt in enumerate(["JPEG", "WEBP"]):
        recs = []
        for j in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (24 + j, 20), (40 * j, 90, 200)).save(buf, format=fmt)
            key = f"{s:05d}{j:04d}"
            recs.append({"__key__": key, "jpg" if fmt == "JPEG" else "webp": buf.getvalue(), "txt": f"photo {key}",
                         "json": {"key": key, "status": "success", "caption": f"photo {key}", "width": 24 + j}})
        write_shard(tmp_path / f"{s:05d}.tar", recs)
    cfg = DataConfig(shards=str(tmp_path / "*.tar"), batch_size=6, loader=loader, workers=0, shuffle_buffer=1,
                     dali_threads=1)
    b = StreamSource(cfg, 16, 4, _caption, 0, 0, 1).batch(0, (0, 1))
    assert sorted(_ids(b)) == [f"photo {s:05d}{j:04d}" for s in range(2) for j in range(3)]
    assert b.images.shape == (6, 3, 16, 16) and not b.masks.any()
