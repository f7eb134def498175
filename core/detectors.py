"""Detectors behind one interface: image -> boxes (pixels) with scores.

* ``oracle`` reads the ground-truth boxes an ICD sample carries in its ``json``.
* ``patch-classifier`` scans a trained :class:`PatchClassifier` over the G x G grid
  and returns the box of every cell it flags (the paper's accessible-classifier path).

Further detectors register with :func:`register_detector` and are chosen by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from geomerase.core.classifiers import PatchClassifier, load_classifier
from geomerase.data.loader import image_to_tensor


@dataclass
class Detection:
    """One found instance of a concept."""

    box: list[float]
    """``[x1, y1, x2, y2]`` in pixels of the image given to the detector."""
    score: float
    """Confidence in [0, 1]."""
    concept: str
    """Concept key (qr, watermark, text)."""

    def to_json(self) -> dict[str, Any]:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "concept": self.concept}


class Detector(ABC):
    """Finds one concept in images."""

    name: str = "detector"
    concept: str = ""

    @abstractmethod
    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        """Detections in ``image`` (``meta`` is the sample's json, for detectors that need it)."""

    def detect_batch(self, images: Sequence[Image.Image], metas: Sequence[dict | None]) -> list[list[Detection]]:
        return [self.detect(im, m) for im, m in zip(images, metas)]


class OracleDetector(Detector):
    """Ground truth: the ``boxes`` an ICD sample carries."""

    name = "oracle"

    def __init__(self, concept: str):
        self.concept = concept

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        if meta is None or "boxes" not in meta:
            raise KeyError("oracle detector needs the sample's json with a 'boxes' field")
        return [Detection(list(map(float, b)), 1.0, self.concept) for b in meta["boxes"]]


class PatchClassifierDetector(Detector):
    """Scan a patch classifier over the grid; each flagged cell becomes a cell-sized box."""

    name = "patch-classifier"

    def __init__(self, concept: str, classifier: PatchClassifier):
        self.concept = concept
        self.classifier = classifier.eval()

    @classmethod
    def from_path(cls, concept: str, path: str | Path) -> "PatchClassifierDetector":
        model, meta = load_classifier(path)
        if not isinstance(model, PatchClassifier):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a PatchClassifier")
        trained_on = meta.get("concept")
        if trained_on not in (None, concept):
            raise ValueError(f"{path}: classifier was trained for concept {trained_on!r}, not {concept!r}")
        return cls(concept, model)

    def _boxes(self, probs: torch.Tensor, width: int, height: int) -> list[Detection]:
        g = self.classifier.cfg.grid
        thr = self.classifier.cfg.overlap_threshold
        out = []
        for idx in torch.nonzero(probs.flatten() >= thr).flatten().tolist():
            r, c = divmod(idx, g)
            box = [c * width / g, r * height / g, (c + 1) * width / g, (r + 1) * height / g]
            out.append(Detection(box, float(probs.flatten()[idx]), self.concept))
        return out

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        return self.detect_batch([image], [meta])[0]

    def detect_batch(self, images: Sequence[Image.Image], metas: Sequence[dict | None]) -> list[list[Detection]]:
        res = self.classifier.cfg.resolution
        x = torch.stack([image_to_tensor(im, res) for im in images]).float() / 127.5 - 1
        probs = self.classifier.cell_probs(x)
        return [self._boxes(p, im.size[0], im.size[1]) for p, im in zip(probs, images)]


DETECTORS: dict[str, Callable[..., Detector]] = {}


def register_detector(name: str, factory: Callable[..., Detector]) -> None:
    """Make ``factory(concept=..., **options)`` available as ``--detector name``."""
    DETECTORS[name] = factory


register_detector("oracle", lambda concept, **kw: OracleDetector(concept))
register_detector("patch-classifier",
                  lambda concept, classifier=None, **kw: PatchClassifierDetector.from_path(concept, classifier)
                  if classifier else _missing("patch-classifier", "classifier"))


def _missing(name: str, option: str):
    raise ValueError(f"detector {name!r} needs --{option} PATH (a folder saved by the classifier trainer)")


def build_detector(name: str, concept: str, **options: Any) -> Detector:
    """Detector by registry name; unknown names list the registered ones."""
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    return DETECTORS[name](concept=concept, **options)
