"""Fault-injection helpers for the Ray annotation job (used by tests and benchmarks).

:class:`PidRecordingDetector` is a real detector wrapper, plugged in by name as
``geomerase.distributed.faults:PidRecordingDetector``: it records the id of the
process it runs in (so a test can kill that worker by pid) and can slow each
image down so a job is still running when the kill arrives.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from geomerase.core.detectors import Detection, Detector, build_detector


class PidRecordingDetector(Detector):
    """Wraps detector ``inner`` (default ``oracle``); writes ``pid_dir/<pid>`` when built and
    sleeps ``delay`` seconds per image."""

    name = "pid-recording"

    def __init__(self, concept: str = "qr", pid_dir: str = "", delay: float | str = 0.0, inner: str = "oracle",
                 **inner_options: Any):
        self.inner = build_detector(inner, concept, **inner_options)
        self.concept = self.inner.concept
        self.delay = float(delay)
        if pid_dir:
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / str(os.getpid())).write_text(str(time.time()))

    def detect(self, image: Image.Image, meta: dict | None = None) -> list[Detection]:
        return self.detect_batch([image], [meta])[0]

    def detect_batch(self, images: Sequence[Image.Image], metas: Sequence[dict | None]) -> list[list[Detection]]:
        if self.delay:
            time.sleep(self.delay * len(images))
        return self.inner.detect_batch(images, metas)
