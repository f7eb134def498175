"""Example detector plug-in: NudeNet's body-part detector for unsafe content (concept ``nudity``).

Not registered by name: it is loaded the way any third-party detector is, by module path::

    geomerase annotate --detector geomerase.core.nudenet_detector:NudeNetDetector \\
        --option min_score=0.5 --input 'shards/*.tar' --out runs/ann_nudity

It needs ``pip install --no-deps nudenet==3.4.2`` (the wheel requires only numpy, onnxruntime and
opencv-python-headless, which the project already has; ``--no-deps`` keeps pip from touching them).
The wheel bundles its YOLOv8 model (``nudenet/320n.onnx``); nothing is downloaded at run time.
NudeNet is AGPL-3.0 licensed and imported only when this detector is built.

The image is resized so its longer side is ``working_size`` (NudeNet pads it to a square of that side,
the model's input), NudeNet's detections of the classes in ``classes`` scoring at least ``min_score``
become :class:`~geomerase.core.detectors.Detection` boxes mapped back to the original image's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from geomerase.core.detector_base import Detection, Detector, box_to_original, resize_to, working_scale
from geomerase.core.detectors_real import _coerce

NUDENET_WHEEL = "nudenet==3.4.2"
EXPOSED: tuple[str, ...] = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                            "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
"""NudeNet classes counted as unsafe by default (its other classes: covered parts, faces, feet, belly,
armpits, male breast)."""


@dataclass
class NudeNetDetectorConfig:
    classes: str = ",".join(EXPOSED)
    """Comma-separated NudeNet class names that count as the concept."""
    min_score: float = 0.4
    """Keep detections scoring at least this (NudeNet itself reports from 0.2)."""
    working_size: int = 320
    """Longer side (px) the image is resized to: the model's input side (``320n.onnx`` was trained at 320)."""
    threads: int = 1
    """ONNX Runtime intra-op threads (1: one core per worker, parallelise with workers)."""

    def validate(self) -> None:
        if not self.class_list or not 0 <= self.min_score <= 1 or self.working_size < 32 or self.threads < 1:
            raise ValueError(f"nudenet detector: invalid options {self}")

    @property
    def class_list(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",") if c.strip()]


def load_nudenet(cfg: NudeNetDetectorConfig) -> Any:
    """``nudenet.NudeDetector`` on the wheel's bundled model, its ONNX session limited to ``cfg.threads``.

    Raises ImportError naming the wheel when nudenet is absent, ValueError for unknown class names."""
    try:
        import nudenet
        import nudenet.nudenet as nn_module
    except ImportError as e:
        raise ImportError(f"the nudenet detector needs pip install --no-deps '{NUDENET_WHEEL}'") from e
    import onnxruntime as ort

    model = Path(nudenet.__file__).parent / "320n.onnx"
    if not model.is_file():
        raise FileNotFoundError(f"nudenet: {model} is missing from the installed package")
    known = getattr(nn_module, "__labels", None)
    unknown = sorted(set(cfg.class_list) - set(known or cfg.class_list))
    if unknown:
        raise ValueError(f"nudenet detector: unknown classes {unknown}; NudeNet's: {known}")
    det = nudenet.NudeDetector(model_path=str(model), inference_resolution=cfg.working_size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1
    # NudeDetector builds its session with ONNX Runtime's default thread count and takes no options.
    det.onnx_session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return det


class NudeNetDetector(Detector):
    """NudeNet's detections of ``classes`` as boxes of the concept ``nudity``.

    Built by ``build_detector("geomerase.core.nudenet_detector:NudeNetDetector", concept, **options)``;
    like the built-in ``qr`` and ``text`` detectors it keeps its own concept key whatever ``concept``
    says (caption phrase: ``--concept-name``)."""

    name = "nudenet"

    def __init__(self, concept: str = "nudity", **options: Any):
        self.concept = "nudity"
        self.cfg = _coerce(NudeNetDetectorConfig, "nudenet", options)
        self.classes = frozenset(self.cfg.class_list)
        self._model = load_nudenet(self.cfg)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Longer side ``working_size``."""
        return working_scale(width, height, self.cfg.working_size)

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        work = self.working_size(*image.size)
        # BGR, as NudeNet's own readers (cv2.imread) hand it images.
        bgr = np.ascontiguousarray(np.asarray(resize_to(image.convert("RGB"), work, Image.BILINEAR))[:, :, ::-1])
        out = []
        for d in self._model.detect(bgr):
            if d["class"] not in self.classes or d["score"] < self.cfg.min_score:
                continue
            x, y, w, h = d["box"]
            box = box_to_original([x, y, x + w, y + h], work, image.size)
            if box is not None:
                out.append(Detection(box, float(d["score"]), self.concept))
        return out
