"""The detector interface and the detectors that need no optional package: image -> boxes (pixels) with scores.

Every detector looks at an image at its own *working size* (:meth:`Detector.working_size`: a QR or
OCR detector at the native size up to a cap, PP-OCR at a fixed longest side, a patch classifier at its
classifier's resolution) and returns boxes in pixels of the *original* image, so the annotator
computes cells from the original size whatever size the detector ran at.

* ``oracle`` reads the ground-truth boxes an ICD sample carries in its ``json``.
* ``patch-classifier`` scans a trained :class:`PatchClassifier` over the G x G grid
  and returns the box of every cell it flags (the paper's accessible-classifier path).
* :class:`MultiDetector` runs several detectors on the same images, each with its own concept.

Detectors register by name with :func:`register_detector` (the real ones in
:mod:`geomerase.core.detectors_real`); :func:`geomerase.core.detectors.build_detector` builds one by
name, plug-in path or comma-separated list.
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
    """``[x1, y1, x2, y2]`` in pixels of the image given to the detector (the original, not the
    detector's working size)."""
    score: float
    """Confidence in [0, 1]."""
    concept: str
    """Concept key (qr, watermark, text)."""

    def to_json(self) -> dict[str, Any]:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "concept": self.concept}


def working_scale(width: int, height: int, longest: int, multiple: int = 1) -> tuple[int, int]:
    """Size (w, h) that brings the longer side of a ``width`` x ``height`` image to ``longest`` px,
    each side rounded to a multiple of ``multiple`` (at least one multiple)."""
    s = longest / max(width, height)
    return (max(multiple, round(width * s / multiple) * multiple),
            max(multiple, round(height * s / multiple) * multiple))


def capped_size(width: int, height: int, scale: float = 1.0, max_side: int = 0) -> tuple[int, int]:
    """The native size times ``scale``, its longer side capped at ``max_side`` (0: no cap)."""
    longest = max(width, height) * scale
    if max_side:
        longest = min(longest, max_side)
    return working_scale(width, height, max(1, round(longest)))


def resize_to(image: Image.Image, size: tuple[int, int], resample: int = Image.BICUBIC) -> Image.Image:
    """``image`` at ``size`` (itself when already that size); PIL's filters other than ``NEAREST``
    average over the source pixels when shrinking."""
    return image if image.size == size else image.resize(size, resample)


def box_to_original(box: Sequence[float], working: tuple[int, int], original: tuple[int, int]) -> list[float] | None:
    """``[x1, y1, x2, y2]`` in pixels of an image resized to ``working`` (w, h) -> pixels of the
    ``original`` (w, h), clipped to it; None when nothing of it is inside."""
    sx, sy = original[0] / working[0], original[1] / working[1]
    x1, y1 = max(0.0, float(box[0]) * sx), max(0.0, float(box[1]) * sy)
    x2, y2 = min(float(original[0]), float(box[2]) * sx), min(float(original[1]), float(box[3]) * sy)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


class Detector(ABC):
    """Finds one concept in images."""

    name: str = "detector"
    concept: str = ""

    @abstractmethod
    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        """Detections in ``image``, boxes in its pixels (``meta`` is the sample's json, for detectors
        that need it)."""

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Size (w, h) this detector looks at a ``width`` x ``height`` image at (default: as it is)."""
        return width, height

    def detect_batch(self, images: Sequence[Image.Image], metas: Sequence[dict | None]) -> list[list[Detection]]:
        return [self.detect(im, m) for im, m in zip(images, metas)]


class OracleDetector(Detector):
    """Ground truth: the ``boxes`` an ICD sample carries (a mixed ICD's ``boxes_by_concept[concept]``)."""

    name = "oracle"

    def __init__(self, concept: str):
        self.concept = concept

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        if meta is None or "boxes" not in meta:
            raise KeyError("oracle detector needs the sample's json with a 'boxes' field")
        boxes = meta["boxes_by_concept"].get(self.concept, []) if "boxes_by_concept" in meta else meta["boxes"]
        return [Detection(list(map(float, b)), 1.0, self.concept) for b in boxes]


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

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """The classifier's square input resolution, whatever the image's size and aspect."""
        res = self.classifier.cfg.resolution
        return res, res

    def _boxes(self, probs: torch.Tensor, width: int, height: int) -> list[Detection]:
        g = self.classifier.cfg.grid
        # The calibrated decision threshold (the one annotation quality is reported at), not the raw
        # coverage share the classifier regresses.
        cfg = self.classifier.cfg
        thr = getattr(self.classifier, "threshold", None)  # a user module may have only cfg.overlap_threshold
        if thr is None:
            thr = getattr(cfg, "decision_threshold", None) or cfg.overlap_threshold
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
        with torch.no_grad():  # a user-supplied module's cell_probs may not disable autograd itself
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


class MultiDetector(Detector):
    """Several detectors applied to the same images; each keeps its own concept.

    ``detect_batch`` returns every member's detections concatenated (each
    :class:`Detection` names its concept); :class:`~geomerase.core.annotate.Annotator`
    groups them per concept. Two members may not share a concept.
    """

    name = "multi"

    def __init__(self, detectors: Sequence[Detector]):
        if not detectors:
            raise ValueError("a multi-detector needs at least one detector")
        concepts = [d.concept for d in detectors]
        dupes = sorted({c for c in concepts if concepts.count(c) > 1})
        if dupes:
            raise ValueError(f"detectors {[d.name for d in detectors]} share concept(s) {dupes}; "
                             "give each concept one detector")
        self.detectors = list(detectors)
        self.concept = ",".join(concepts)

    @property
    def concepts(self) -> list[str]:
        return [d.concept for d in self.detectors]

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        return self.detect_batch([image], [meta])[0]

    def detect_batch(self, images: Sequence[Image.Image], metas: Sequence[dict | None]) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in images]
        for det in self.detectors:
            for acc, found in zip(out, det.detect_batch(images, metas)):
                acc.extend(found)
        return out
