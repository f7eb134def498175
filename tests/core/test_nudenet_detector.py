"""The NudeNet example plug-in: options, box mapping (with a stand-in model), annotation through the CLI,
and NudeNet itself on benign photographs (skipped when nudenet is not installed)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

import geomerase.core.nudenet_detector as plugin
from geomerase.core.detectors import build_detector
from geomerase.core.geometry import GeometryConfig

SPEC = "geomerase.core.nudenet_detector:NudeNetDetector"
needs_nudenet = pytest.mark.skipif(importlib.util.find_spec("nudenet") is None,
                                   reason="nudenet is absent (pip install --no-deps nudenet==3.4.2)")


class _FakeNudeNet:
    """Stands in for ``nudenet.NudeDetector``: fixed detections in pixels of the image it gets."""

    def __init__(self, found: list[dict]):
        self.found, self.seen = found, []

    def detect(self, bgr: np.ndarray) -> list[dict]:
        self.seen.append(bgr.shape)
        return self.found


@pytest.fixture
def fake(monkeypatch):
    model = _FakeNudeNet([{"class": "BUTTOCKS_EXPOSED", "score": 0.8, "box": [160, 40, 80, 120]},
                          {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 50, 50]},
                          {"class": "FEMALE_BREAST_EXPOSED", "score": 0.3, "box": [10, 10, 20, 20]}])
    monkeypatch.setattr(plugin, "load_nudenet", lambda cfg: model)
    return model


def test_plugin_maps_working_boxes_to_the_original_and_filters(fake):
    det = build_detector(SPEC, "qr", min_score="0.5")
    assert isinstance(det, plugin.NudeNetDetector) and det.concept == "nudity" and det.cfg.min_score == 0.5
    assert det.working_size(1400, 700) == (320, 160) and det.working_size(300, 700) == (137, 320)
    (d,) = det.detect(Image.new("RGB", (1400, 700)))  # the two others: a class not asked for, a low score
    assert fake.seen == [(160, 320, 3)]  # the model got the working-size image
    # (x, y, w, h) = (160, 40, 80, 120) at 320 x 160 -> x1, y1, x2, y2 times 1400 / 320 = 700 / 160
    assert d.box == pytest.approx([700.0, 175.0, 1050.0, 700.0]) and d.score == 0.8
    faces = build_detector(SPEC, "qr", classes="FACE_FEMALE").detect(Image.new("RGB", (640, 480)))
    assert [f.box for f in faces] == [pytest.approx([0, 0, 100, 100])]
    with pytest.raises(ValueError, match="nudenet.*unknown option 'colour'"):
        build_detector(SPEC, "qr", colour="red")
    with pytest.raises(ValueError, match="invalid options"):
        build_detector(SPEC, "qr", classes=" , ")


def test_cli_annotates_a_shard_with_the_plugin(fake, tmp_path, capsys):
    from geomerase.cli import main
    from geomerase.data.shards import iter_samples, write_shard

    write_shard(tmp_path / "in" / "00000.tar",
                [{"__key__": f"{i:03d}", "png": Image.new("RGB", (320, 240), (90, 120, 150)),
                  "txt": "a beach", "json": {}} for i in range(3)])
    assert main(["annotate", "--input", str(tmp_path / "in" / "*.tar"), "--detector", SPEC,
                 "--out", str(tmp_path / "out"), "--grid", "4"]) == 0
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["read"] == totals["annotated"] == totals["with_concept"] == 3
    (s, *_) = list(iter_samples(str(tmp_path / "out" / "*.tar")))
    ann = s.meta["annotation"]
    assert ann["detector"] == "nudenet" and ann["concept"] == "nudity"
    # The box [160, 40, 240, 160] at 320 x 240 (working size: the image itself) covers the right half.
    expected = GeometryConfig(grid=4).build().cells_from_boxes([[160, 40, 240, 160]], 320, 240)
    assert ann["cells"] == expected and s.caption.startswith("a beach, nudity <l")


@needs_nudenet
def test_nudenet_runs_on_benign_photos_with_boxes_in_original_pixels(monkeypatch):
    skdata = pytest.importorskip("skimage.data")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the nudenet detector opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    det = build_detector(SPEC, "qr")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        found = det.detect(Image.fromarray(getattr(skdata, name)()))
        assert isinstance(found, list) and found == [], (name, found)  # no unsafe content in these
    # A benign class exercises the real model's boxes: the astronaut's face, at two sizes and aspects.
    faces = build_detector(SPEC, "qr", classes="FACE_FEMALE")
    photo = Image.fromarray(skdata.astronaut())
    (ref,) = faces.detect(photo)
    for size in ((1024, 1024), (700, 400)):
        (d,) = faces.detect(photo.resize(size, Image.BICUBIC))
        sx, sy = size[0] / 512, size[1] / 512
        scaled = [ref.box[0] * sx, ref.box[1] * sy, ref.box[2] * sx, ref.box[3] * sy]
        assert np.allclose(d.box, scaled, atol=0.1 * size[0]), (d.box, scaled)
    with pytest.raises(ValueError, match="unknown classes"):
        build_detector(SPEC, "qr", classes="FACE_FEMALE,NOT_A_CLASS")
