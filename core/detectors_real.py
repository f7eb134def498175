"""Real detectors: OpenCV QR codes, Tesseract text, classifier-scanned watermarks.

Each returns :class:`~geomerase.core.detectors.Detection` boxes in pixels of the
image it is given, with a score in [0, 1], and is registered by name in
:mod:`geomerase.core.detectors` (``qr``, ``text``, ``watermark``). Options are typed
dataclass fields; unknown options are errors naming the detector and the field.

Sizes these detectors need at 256 px (measured on held-out ICD images, see
``benchmarks/results/annotate_cpu.md``): OpenCV finds no code under 44 px side (quiet zone
included) and 90% from 44 px (51 px when decoding is required); Tesseract finds text lines from
7 px tall, 13/15 of the 16-24 px lines, none under 6 px.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from geomerase.core.detectors import Detection, Detector, PatchClassifierDetector, register_detector

# Options every factory tolerates because the CLI passes them to all members of a
# multi-detector run; detectors that do not use them ignore them.
_SHARED_OPTIONS = frozenset({"classifier"})


def _coerce(cls: type, name: str, options: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``options`` (strings from the CLI are converted to the field types)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key, value in options.items():
        if key in _SHARED_OPTIONS and key not in fields:
            continue
        if key not in fields:
            raise ValueError(f"detector {name!r}: unknown option {key!r}; options: {sorted(fields)}")
        kind = fields[key].type if isinstance(fields[key].type, type) else str(fields[key].type)
        kw[key] = _convert(name, key, value, kind)
    cfg = cls(**kw)
    cfg.validate()
    return cfg


def _convert(name: str, key: str, value: Any, kind: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if kind in (bool, "bool"):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, "int"):
            return int(value)
        if kind in (float, "float"):
            return float(value)
    except ValueError:
        raise ValueError(f"detector {name!r}: option {key!r} needs a {kind}, got {value!r}") from None
    return value


# --------------------------------------------------------------------------- QR


@dataclass
class QRDetectorConfig:
    require_decode: bool = False
    """Keep only codes whose content OpenCV decodes (fewer false boxes, misses damaged codes)."""
    upscale: float = 1.0
    """Resize the image by this factor before detection (boxes are mapped back); >1 helps small codes."""
    min_side: float = 8.0
    """Drop candidate quadrilaterals whose bounding box is smaller than this many pixels (original image)."""

    def validate(self) -> None:
        if self.upscale <= 0 or self.min_side < 0:
            raise ValueError(f"qr detector: need upscale > 0 and min_side >= 0, got {self.upscale}, {self.min_side}")


class QRDetector(Detector):
    """OpenCV's ``QRCodeDetector`` in multi-code mode; one box per code (bounding box of its corners).

    Score: 1.0 for a decoded code, 0.5 for one that was located but not decoded
    (only kept when ``require_decode`` is off).
    """

    name = "qr"

    def __init__(self, concept: str = "qr", cfg: QRDetectorConfig | None = None):
        import cv2  # opencv-python-headless, a core dependency

        self.cv2 = cv2
        self.concept = concept or "qr"
        self.cfg = cfg or QRDetectorConfig()
        self._det = cv2.QRCodeDetector()

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        cfg = self.cfg
        im = image.convert("RGB")
        if cfg.upscale != 1.0:
            im = im.resize((max(1, round(im.width * cfg.upscale)), max(1, round(im.height * cfg.upscale))),
                           Image.NEAREST)
        arr = np.ascontiguousarray(np.asarray(im)[:, :, ::-1])  # BGR
        try:
            ok, texts, points, _ = self._det.detectAndDecodeMulti(arr)
        except self.cv2.error:
            ok, texts, points = False, (), None
        if not ok or points is None:
            if cfg.require_decode:
                return []
            try:
                ok, points = self._det.detectMulti(arr)
            except self.cv2.error:
                ok, points = False, None
            if not ok or points is None:
                return []
            texts = ("",) * len(points)
        out = []
        for text, quad in zip(texts, np.asarray(points, np.float64).reshape(-1, 4, 2)):
            if cfg.require_decode and not text:
                continue
            quad = quad / cfg.upscale
            x1, y1 = quad.min(0)
            x2, y2 = quad.max(0)
            if min(x2 - x1, y2 - y1) < cfg.min_side:
                continue
            out.append(Detection([x1, y1, x2, y2], 1.0 if text else 0.5, self.concept))
        return out


# ------------------------------------------------------------------------- text


class TesseractMissing(FileNotFoundError):
    """The ``tesseract`` binary is not installed (Debian: ``apt-get install tesseract-ocr``)."""


def tesseract_path() -> str | None:
    """Path of the ``tesseract`` binary, or None."""
    return shutil.which("tesseract")


@dataclass
class TextDetectorConfig:
    min_conf: float = 40.0
    """Keep words Tesseract reads with at least this confidence (0-100)."""
    min_height: int = 6
    """Keep word boxes at least this many pixels tall (original image)."""
    min_chars: int = 1
    """Keep words with at least this many letters or digits."""
    psm: int = 11
    """Tesseract page segmentation mode: 11 = sparse text, any order (overlays, memes)."""
    upscale: float = 1.0
    """Resize by this factor before OCR (boxes mapped back); 2 helps glyphs under ~10 px."""
    grayscale: bool = True
    """OCR a grey-level version (measured: reads outlined/colour text better than RGB)."""
    threads: int = 1
    """OMP_THREAD_LIMIT for the tesseract process (1: one core per worker, parallelise with workers)."""

    def validate(self) -> None:
        if not 0 <= self.min_conf <= 100 or self.min_height < 0 or self.upscale <= 0 or self.threads < 1:
            raise ValueError(f"text detector: invalid options {self}")


class TextDetector(Detector):
    """Tesseract word boxes (``pytesseract.image_to_data``), filtered by confidence, height and length."""

    name = "text"

    def __init__(self, concept: str = "text", cfg: TextDetectorConfig | None = None):
        try:
            import pytesseract
        except ImportError as e:
            raise ImportError("text detector needs pytesseract: pip install 'geomerase[detectors]'") from e
        if tesseract_path() is None:
            raise TesseractMissing("text detector: the 'tesseract' binary is not on PATH; install Debian's "
                                   "'tesseract-ocr' (bash scripts/setup.sh --test does, or apt-get install tesseract-ocr)")
        self.pytesseract = pytesseract
        self.concept = concept or "text"
        self.cfg = cfg or TextDetectorConfig()

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        cfg = self.cfg
        im = ImageOps.grayscale(image) if cfg.grayscale else image.convert("RGB")
        if cfg.upscale != 1.0:
            im = im.resize((max(1, round(im.width * cfg.upscale)), max(1, round(im.height * cfg.upscale))),
                           Image.BICUBIC)
        env_before = os.environ.get("OMP_THREAD_LIMIT")
        os.environ["OMP_THREAD_LIMIT"] = str(cfg.threads)
        try:
            d = self.pytesseract.image_to_data(im, config=f"--psm {cfg.psm}",
                                               output_type=self.pytesseract.Output.DICT)
        finally:
            if env_before is None:
                os.environ.pop("OMP_THREAD_LIMIT", None)
            else:
                os.environ["OMP_THREAD_LIMIT"] = env_before
        out = []
        s = cfg.upscale
        for text, conf, x, y, w, h in zip(d["text"], d["conf"], d["left"], d["top"], d["width"], d["height"]):
            conf = float(conf)
            if conf < cfg.min_conf or sum(ch.isalnum() for ch in str(text)) < cfg.min_chars:
                continue
            if h / s < cfg.min_height:
                continue
            out.append(Detection([x / s, y / s, (x + w) / s, (y + h) / s], conf / 100.0, self.concept))
        return out


# -------------------------------------------------------------------- watermark


class TorchCellDetector(PatchClassifierDetector):
    """Any torch module with ``cell_probs(images (B,3,R,R) in [-1,1]) -> (B,G,G)`` scanned like the
    patch classifier; it needs ``cfg.resolution``, ``cfg.grid`` and ``cfg.overlap_threshold``
    (or plain attributes of those names)."""

    name = "torch-cells"

    @classmethod
    def from_class(cls, model_cls: type, concept: str, classifier: str | None = None,
                   **kwargs: Any) -> "TorchCellDetector":
        """Instantiate ``model_cls(**kwargs)``, load ``classifier`` (a .safetensors file or a folder
        holding ``model.safetensors``) when given, and wrap it."""
        model = model_cls(**kwargs)
        if not hasattr(model, "cell_probs"):
            raise TypeError(f"{model_cls.__module__}:{model_cls.__name__} has no cell_probs(images) method")
        if not hasattr(model, "cfg"):
            missing = [a for a in ("resolution", "grid", "overlap_threshold") if not hasattr(model, a)]
            if missing:
                raise TypeError(f"{model_cls.__name__} lacks cfg or attributes {missing}")
            model.cfg = SimpleNamespace(resolution=model.resolution, grid=model.grid,  # type: ignore[attr-defined]
                                        overlap_threshold=model.overlap_threshold)
        if classifier:
            from safetensors.torch import load_file

            path = Path(classifier)
            weights = path / "model.safetensors" if path.is_dir() else path
            if not weights.is_file():
                raise FileNotFoundError(f"{classifier}: no safetensors weights found")
            model.load_state_dict(load_file(str(weights)))
        return cls(concept, model)


def _qr_factory(concept: str = "qr", **options: Any) -> QRDetector:
    return QRDetector("qr", _coerce(QRDetectorConfig, "qr", options))


def _text_factory(concept: str = "text", **options: Any) -> TextDetector:
    return TextDetector("text", _coerce(TextDetectorConfig, "text", options))


def _watermark_factory(concept: str = "watermark", classifier: str | None = None, **options: Any) -> Detector:
    if options:
        raise ValueError(f"detector 'watermark': unknown options {sorted(options)}; it takes classifier=PATH")
    if not classifier:
        raise ValueError("detector 'watermark' needs --classifier PATH (a patch classifier trained on watermark "
                         "data: geomerase classifier train --concept watermark ...)")
    return PatchClassifierDetector.from_path("watermark", classifier)


register_detector("qr", _qr_factory)
register_detector("text", _text_factory)
register_detector("watermark", _watermark_factory)

