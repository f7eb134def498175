"""The wide watermark family (``data.watermarks``): the shipped watermark detector's training data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from geomerase.data.concepts import FONT_FILES
from geomerase.data.watermarks import TRAIN_FONTS, add_wide_watermark, background


def test_training_fonts_are_none_of_the_icd_rules_faces():
    assert TRAIN_FONTS and not set(TRAIN_FONTS) & set(FONT_FILES)
    assert None in TRAIN_FONTS  # Pillow's built-in face


def test_marks_get_valid_boxes_over_changed_pixels_and_are_seeded():
    hits = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        img = background(rng, 128, photos=[])  # procedural backgrounds only (no scikit-image needed)
        out, boxes = add_wide_watermark(img, rng)
        assert out.size == img.size and out.mode == "RGB"
        a, b = np.asarray(img, np.int16), np.asarray(out, np.int16)
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
        hits += bool(boxes) and bool(np.abs(a - b).max() > 0)
        rng2 = np.random.default_rng(seed)  # the same seed draws the same background, then the same mark
        bg2 = background(rng2, 128, photos=[])
        assert np.array_equal(np.asarray(bg2), np.asarray(img))
        assert add_wide_watermark(bg2, rng2)[1] == boxes
    assert hits >= 10  # nearly every call draws a visible mark (a tiling may fall outside the frame)


def test_photo_backgrounds_come_from_photos_the_evaluation_does_not_use():
    pytest.importorskip("skimage")
    from geomerase.benchmarks.text_detectors import PHOTOS
    from geomerase.data.watermarks import TRAIN_PHOTOS, training_photos

    assert not set(TRAIN_PHOTOS) & set(PHOTOS)
    photos = training_photos()
    assert len(photos) == len(TRAIN_PHOTOS) and all(p.ndim == 3 and p.shape[2] == 3 for p in photos)
    img = background(np.random.default_rng(0), 64, photos)
    assert isinstance(img, Image.Image) and img.size == (64, 64)
