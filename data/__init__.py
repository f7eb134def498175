"""Data for Geom-Erasing: the Implicit Concept Dataset (ICD) and shard I/O.

``scenes`` draws procedural scenes with clean captions, ``concepts`` overlays
the implicit concepts (QR codes, watermarks, text) and returns their boxes,
``icd`` writes the dataset as deterministic webdataset shards, and ``shards``
reads/writes tar shards robustly (bad samples are skipped, counted and logged).
"""
from geomerase.data.concepts import CONCEPT_NAMES, CONCEPTS, add_qr, add_text, add_watermark
from geomerase.data.icd import build_icd, has_concept, make_sample, preview_grid, sample_key
from geomerase.data.scenes import (BACKGROUNDS, COLOURS, SHAPES, Scene, SceneObject, caption,
                                   render_scene, sample_scene, scene_attributes)
from geomerase.data.shards import Sample, SkipCounter, expand_urls, iter_samples, write_shard

__all__ = [
    "BACKGROUNDS", "COLOURS", "SHAPES", "Scene", "SceneObject", "sample_scene", "render_scene",
    "caption", "scene_attributes",
    "CONCEPTS", "CONCEPT_NAMES", "add_qr", "add_watermark", "add_text",
    "build_icd", "has_concept", "make_sample", "preview_grid", "sample_key",
    "Sample", "SkipCounter", "iter_samples", "write_shard", "expand_urls",
]
