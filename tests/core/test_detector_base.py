"""The detector interface (``core/detector_base.py``): working sizes and box mapping, the patch-classifier
detector's threshold, the oracle and the multi-detector's concept rule."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from geomerase.core.classifiers import PatchClassifierConfig
from geomerase.core.detector_base import (MultiDetector, OracleDetector, PatchClassifierDetector, box_to_original,
                                          capped_size, working_scale)


def test_working_sizes_keep_the_aspect_and_round_to_multiples():
    assert working_scale(1024, 512, 256) == (256, 128)
    assert working_scale(1000, 30, 64, multiple=32) == (64, 32)  # at least one multiple
    assert capped_size(800, 600) == (800, 600)
    assert capped_size(800, 600, scale=0.5) == (400, 300)
    assert capped_size(4000, 1000, max_side=1000) == (1000, 250)


def test_boxes_map_back_to_original_pixels_and_are_clipped():
    assert box_to_original([10, 20, 30, 40], (100, 100), (400, 200)) == [40.0, 40.0, 120.0, 80.0]
    assert box_to_original([90, 90, 120, 130], (100, 100), (100, 100)) == [90.0, 90.0, 100.0, 100.0]
    assert box_to_original([110, 0, 120, 10], (100, 100), (100, 100)) is None  # wholly outside


def test_oracle_reads_the_ground_truth_boxes_of_its_concept():
    det = OracleDetector("qr")
    meta = {"boxes": [[1, 2, 3, 4]], "concept": "qr"}
    (d,) = det.detect(Image.new("RGB", (8, 8)), meta)
    assert d.box == [1, 2, 3, 4] and d.concept == "qr"
    assert det.detect(Image.new("RGB", (8, 8)), {"boxes": []}) == []
    with pytest.raises(ValueError, match="share concept"):
        MultiDetector([OracleDetector("qr"), OracleDetector("qr")])


def test_patch_classifier_detector_uses_the_calibrated_threshold():
    # Annotation quality is reported at the calibrated decision threshold; the detector must write
    # location tokens at that threshold too, not at the raw coverage share the classifier regresses.
    pc = PatchClassifierConfig(resolution=8, grid=2, width=8, overlap_threshold=0.25).build()
    probs = torch.tensor([[[0.3, 0.6], [0.1, 0.9]]])
    pc.cell_probs = lambda x, batch=256: probs.expand(x.shape[0], -1, -1)
    det = PatchClassifierDetector("qr", pc)
    assert len(det.detect(Image.new("RGB", (8, 8)))) == 3  # 0.3, 0.6, 0.9 >= 0.25
    pc.cfg.decision_threshold = 0.5
    assert [d.score for d in det.detect(Image.new("RGB", (8, 8)))] == pytest.approx([0.6, 0.9])
