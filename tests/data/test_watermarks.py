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


def test_clean_samples_and_textures_have_no_boxes_and_are_seeded():
    from geomerase.data.watermarks import RECIPES, render_sample, texture

    recipe = RECIPES["v2"]
    kinds = set()
    for seed in range(16):
        img, boxes = render_sample(np.random.default_rng(seed), 96, [], False, recipe)
        assert boxes == [] and img.size == (96, 96) and img.mode == "RGB"
        again, _ = render_sample(np.random.default_rng(seed), 96, [], False, recipe)
        assert np.array_equal(np.asarray(img), np.asarray(again))
        tex = np.asarray(texture(np.random.default_rng(seed), 64))
        assert tex.shape == (64, 64, 3) and tex.dtype == np.uint8
        assert np.array_equal(tex, np.asarray(texture(np.random.default_rng(seed), 64)))
        kinds.add(tex.std() > 1)
    assert kinds == {True}  # textures, not flat fields


def test_augmented_photo_is_seeded_and_sized():
    from geomerase.data.watermarks import augmented_photo

    photo = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    a = augmented_photo(np.random.default_rng(5), photo, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(augmented_photo(np.random.default_rng(5), photo, 64)))


def test_marked_images_are_spread_evenly_at_the_recipes_share():
    from geomerase.data.watermarks import RECIPES, is_marked

    assert [is_marked(i, 0.5) for i in range(4)] == [True, False, True, False]  # the first recipe's order
    for recipe in RECIPES.values():
        share = sum(is_marked(i, recipe.clean_share) for i in range(1000)) / 1000
        assert abs(share - (1 - recipe.clean_share)) < 0.002
        assert not any(all(is_marked(i + j, recipe.clean_share) for j in range(3)) for i in range(100))
