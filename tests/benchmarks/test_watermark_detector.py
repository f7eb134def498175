"""The shipped watermark detector: a short rebuild runs the recipe (render, train, calibrate, fp16 + manifest),
``--detector watermark`` loads the shipped weights without a classifier path, and damaged weights are refused."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from geomerase.core.checkpoint import verify_manifest
from geomerase.core.detectors import PatchClassifierDetector, build_detector

pytest.importorskip("skimage")


def test_short_rebuild_writes_checked_fp16_weights_that_detect(tmp_path, monkeypatch):
    import geomerase.core.detectors_real as real
    from geomerase.benchmarks.watermark_detector import RES, build
    from safetensors.torch import load_file

    record = build(n=40, steps=2, seed=0, out=tmp_path / "wm")
    assert verify_manifest(tmp_path / "wm") is None
    assert {v.dtype for v in load_file(str(tmp_path / "wm" / "model.safetensors")).values()} == {torch.float16}
    assert record["steps"] == 2 and 0 < record["calibration"]["threshold"] < 1
    monkeypatch.setattr(real, "shipped_watermark_dir", lambda: tmp_path / "wm")
    det = build_detector("watermark", "watermark")
    assert isinstance(det, PatchClassifierDetector) and det.classifier.cfg.resolution == RES
    for d in det.detect(Image.new("RGB", (640, 480), (90, 120, 200))):
        assert 0 <= d.box[0] < d.box[2] <= 640 and 0 <= d.box[1] < d.box[3] <= 480  # boxes of the original image
    (tmp_path / "wm" / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="shipped watermark detector is damaged"):
        build_detector("watermark", "watermark")


def test_the_package_ships_a_verified_watermark_detector(tmp_path):
    from geomerase.core.detectors_real import shipped_watermark_dir, shipped_watermark_record

    folder = shipped_watermark_dir()
    assert verify_manifest(folder) is None, "rebuild: python -m geomerase.benchmarks.watermark_detector build"
    assert shipped_watermark_record()["command"].startswith("python -m geomerase.benchmarks.watermark_detector build")
    assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000  # small
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert isinstance(build_detector("watermark", "watermark", classifier=str(copy)), PatchClassifierDetector)


def test_a_build_can_continue_from_earlier_weights_and_records_them(tmp_path):
    import hashlib

    from geomerase.benchmarks.watermark_detector import build
    from geomerase.core.classifiers import load_classifier

    build(n=30, steps=1, seed=0, out=tmp_path / "first", recipe="v1")
    record = build(n=30, steps=2, seed=1, out=tmp_path / "next", recipe="v2", init=tmp_path / "first", lr=1e-3)
    sha = hashlib.sha256((tmp_path / "first" / "model.safetensors").read_bytes()).hexdigest()
    assert record["init"]["sha256"] == sha and record["init"]["build"]["recipe"] == "v1"
    assert record["recipe"] == "v2" and f"--init {tmp_path / 'first'}" in record["command"]
    assert verify_manifest(tmp_path / "next") is None
    model, meta = load_classifier(tmp_path / "next")
    assert meta["build"]["steps"] == 2 and model.cfg.resolution == 128
