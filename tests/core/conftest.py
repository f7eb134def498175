"""Fixtures: a tiny annotated ICD (oracle detector) shared by the core tests.

Imports stay inside the fixture: the GPU check runs this folder's attention tests on a
machine without the data dependencies (qrcode), where a module-level import would stop
pytest from loading the conftest at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_icd(tmp_path_factory) -> Path:
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    root = tmp_path_factory.mktemp("icd")
    build_icd("qr", 48, 0.5, 32, 0, root / "raw", shard_size=24, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return root
