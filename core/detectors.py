"""Building detectors by name: ``build_detector("qr")``, ``"module:Class"`` plug-ins, ``"qr,text"`` lists.

* ``oracle`` and ``patch-classifier``: :mod:`geomerase.core.detector_base` (the interface).
* ``qr`` (OpenCV's multi-code QR detector), ``text`` (PP-OCR's text-region model through ONNX
  Runtime, also ``text-ppocr``; Tesseract word boxes are ``text-tesseract``) and ``watermark``
  (the patch-classifier path with the shipped classifier): :mod:`geomerase.core.detectors_real`.

Further detectors register with :func:`register_detector`, or are named ``module:Class``
(imported explicitly with importlib, never evaluated); several names joined by commas build a
:class:`MultiDetector` that records every concept separately. The interface's names are
re-exported here, so ``geomerase.core.detectors`` is the one import a caller needs.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

import geomerase.core.detectors_real  # noqa: F401  (registers qr, text*, watermark)
from geomerase.core.detector_base import (DETECTORS, Detection, Detector, MultiDetector, OracleDetector,
                                          PatchClassifierDetector, box_to_original, capped_size, register_detector,
                                          resize_to, working_scale)
from geomerase.core.detectors_real import TorchCellDetector

__all__ = ["DETECTORS", "Detection", "Detector", "MultiDetector", "OracleDetector", "PatchClassifierDetector",
           "box_to_original", "build_detector", "capped_size", "register_detector", "resize_to", "working_scale"]


def _import_detector(spec: str, concept: str, options: dict[str, Any]) -> Detector:
    """``module:attr`` -> a Detector: a Detector subclass, a factory returning one, or a
    torch module with ``cell_probs`` (wrapped as a grid scan)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in attr.split(".") + module_name.split(".")):
        raise ValueError(f"detector {spec!r}: a plug-in is named 'module.path:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"detector {spec!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"detector {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, Detector):
        return obj(concept=concept, **options)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return TorchCellDetector.from_class(obj, concept, **options)
    if callable(obj) and not isinstance(obj, type):
        det = obj(concept=concept, **options)
        if not isinstance(det, Detector):
            raise TypeError(f"detector {spec!r}: factory returned a {type(det).__name__}, not a Detector")
        return det
    raise TypeError(f"detector {spec!r} is a {type(obj).__name__}: need a Detector subclass, a factory "
                    "returning one, or a torch.nn.Module class with cell_probs()")


def _split_options(names: list[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Options for each of ``names``: ``"name.key"`` goes to that detector only, a plain key to all
    that accept it (unknown plain keys are left for each factory to reject)."""
    per: list[dict[str, Any]] = [{} for _ in names]
    for key, value in options.items():
        target, dot, sub = key.partition(".")
        if dot:
            if target not in names:
                raise ValueError(f"option {key!r} names detector {target!r}, which is not among {names}")
            per[names.index(target)][sub] = value
        else:
            for d in per:
                d[key] = value
    return per


def build_detector(name: str, concept: str, **options: Any) -> Detector:
    """Detector by registry name, ``module:Class`` plug-in, or comma-separated list of them.

    ``options`` go to the detector's factory (``classifier=PATH``, ``require_decode=True``...);
    with several detectors, ``"qr.require_decode"`` addresses one of them. Unknown names list the
    registered ones.
    """
    names = [n.strip() for n in name.split(",") if n.strip()]
    if not names:
        raise ValueError("empty detector name")
    if len(names) > 1:
        return MultiDetector([build_detector(n, concept, **o) for n, o in zip(names, _split_options(names, options))])
    name = names[0]
    if ":" in name:
        return _import_detector(name, concept, options)
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)} (or 'module:Class')")
    return DETECTORS[name](concept=concept, **options)
