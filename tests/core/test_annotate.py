"""Annotation (`core.annotate`): shards carry location tokens and the input bytes; bad samples skipped, counted, resumed."""
from __future__ import annotations

import json

import torch

from geomerase.core.annotate import Annotator, annotate_shards
from geomerase.core.detectors import OracleDetector
from geomerase.core.geometry import GeometryConfig
from geomerase.core.tokenizer import build_tokenizer
from geomerase.data.loader import InMemoryDataset
from geomerase.data.shards import SkipCounter, iter_samples, write_shard


def test_annotated_shards_carry_tokens_and_clean_caption(tiny_icd):
    samples = list(iter_samples(str(tiny_icd / "ann" / "*.tar")))
    assert len(samples) == 48
    with_concept = [s for s in samples if s.meta["boxes"]]
    assert with_concept and len(with_concept) < 48
    for s in samples:
        ann = s.meta["annotation"]
        assert s.meta["caption_clean"] and "qr" not in s.meta["caption_clean"]
        if s.meta["boxes"]:
            assert ann["cells"] and s.caption == f"{s.meta['caption_clean']}, qr code " + " ".join(ann["tokens"])
        else:
            assert ann["cells"] == [] and s.caption == s.meta["caption_clean"]
    manifest = json.loads((tiny_icd / "ann" / "_manifest.json").read_text())
    assert manifest["totals"]["annotated"] == 48 and manifest["totals"]["skipped"] == 0


def test_annotated_shards_keep_the_input_png_bytes(tiny_icd):
    raw = {s.key: s for s in iter_samples(str(tiny_icd / "raw" / "*.tar"))}
    for s in iter_samples(str(tiny_icd / "ann" / "*.tar")):
        assert s.image_ext == "png" and s.image_bytes == raw[s.key].image_bytes


def test_annotate_skips_and_counts_bad_samples_and_resumes(tiny_icd, tmp_path, caplog):
    good = list(iter_samples(str(tiny_icd / "raw" / "icd-qr-000000.tar")))[:3]
    recs = [{"__key__": s.key, "png": b"\x89PNG broken", "txt": s.caption, "json": s.meta} for s in good[:1]]
    recs.append({"__key__": good[1].key, "png": (tiny_icd / "raw").joinpath("x").name.encode(), "json": good[1].meta})
    from geomerase.data.shards import encode_png
    recs.append({"__key__": good[2].key, "png": encode_png(good[2].image), "txt": good[2].caption, "json": good[2].meta})
    write_shard(tmp_path / "in" / "bad-000000.tar", recs)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4), build_tokenizer(4), "qr code")
    m = annotate_shards(ann, str(tmp_path / "in" / "*.tar"), tmp_path / "out", progress=False)
    counts = m["shards"]["bad-000000.tar"]
    assert counts["read"] == 3 and counts["annotated"] == 1
    assert counts["skipped"] == {"bad image": 1, "missing field 'txt'": 1}
    assert good[0].key in caplog.text and "bad-000000.tar" in caplog.text
    # A rerun finds the shard committed and does nothing.
    mtime = (tmp_path / "out" / "bad-000000.tar").stat().st_mtime_ns
    annotate_shards(ann, str(tmp_path / "in" / "*.tar"), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "bad-000000.tar").stat().st_mtime_ns == mtime


def test_loader_counts_skips(tiny_icd, tmp_path):
    path = tmp_path / "t-000000.tar"
    good = list(iter_samples(str(tiny_icd / "ann" / "*.tar")))[:2]
    from geomerase.data.shards import encode_png
    write_shard(path, [{"__key__": good[0].key, "png": encode_png(good[0].image), "txt": "x", "json": good[0].meta},
                       {"__key__": good[1].key, "png": b"nope", "txt": "y", "json": good[1].meta}])
    skips = SkipCounter()
    ds = InMemoryDataset(str(path), 16, skips=skips)
    assert len(ds) == 1 and skips.counts["bad image"] == 1
    assert ds.images.shape == (1, 3, 16, 16) and ds.images.dtype == torch.uint8


def test_corner_mode_annotation_keeps_pairs_for_captions_and_covered_cells_for_masks(tiny_icd, tmp_path):
    geo = GeometryConfig(grid=4, mode="corner")
    ann = Annotator(OracleDetector("qr"), geo, build_tokenizer(4), "qr code")
    annotate_shards(ann, str(tiny_icd / "raw" / "*.tar"), tmp_path / "out", progress=False)
    data = InMemoryDataset(str(tmp_path / "out" / "*.tar"), resolution=32)
    cells_enc, corner_enc = GeometryConfig(grid=4).build(), geo.build()
    masks = data.cell_masks(4).view(len(data), -1)
    raw = {s.key: s for s in iter_samples(str(tiny_icd / "raw" / "*.tar"))}
    seen = 0
    for rec, mask in zip(data.records, masks):
        boxes, size = raw[rec.key].meta["boxes"], raw[rec.key].image.size
        if not boxes:
            assert rec.concepts == [] and not mask.any()
            continue
        seen += 1
        pairs = corner_enc.corner_pairs(boxes, *size)
        assert rec.concepts == [("qr code", pairs)]  # ordered pairs, as the caption names them
        assert rec.cells == cells_enc.cells_from_boxes(boxes, *size)  # the region, not the corners
        assert mask.nonzero().flatten().tolist() == rec.cells
    assert seen > 0

