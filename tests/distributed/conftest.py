"""Fixtures for the DeepSpeed tests: a tiny annotated ICD and the environment for launched ranks."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zero_icd(tmp_path_factory) -> Path:
    """48 annotated 32 px samples in 4 shards (oracle detector, grid 4)."""
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    root = tmp_path_factory.mktemp("zero_icd")
    build_icd("qr", 48, 0.5, 32, 0, root / "raw", shard_size=12, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return root
