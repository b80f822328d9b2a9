"""``Detector``: a bundle's engine wrapped in YOLOv5's pre- and post-processing."""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, load_bundle
from .detections import Detections
from .images import as_bgr
from .postprocess import decode_sigmoid_head, non_max_suppression, scale_boxes
from .preprocess import LetterboxSettings, letterbox, to_input


@dataclass
class StageTimes:
    """Seconds spent per stage by the last ``detect`` call (read by ``bench``)."""

    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    extra: dict = field(default_factory=dict)


class Detector:
    """Detect objects with one bundle's engine; ``detect()`` is all most callers need.

    One ``Detector`` may be shared by several threads: pre- and post-processing keep no shared
    state, ``last_times`` is per thread, and each backend's engine is thread-safe in its own way
    (ONNX Runtime's session is; OpenVINO lends each call an infer request from a pool; LiteRT's
    interpreter runs one call at a time under a lock). Results equal those of serial calls.
    """

    def __init__(self, bundle: Bundle, engine, conf: float = 0.25, iou: float = 0.45, max_det: int = 300):
        self.bundle = bundle
        self.engine = engine
        manifest = bundle.manifest
        self.letterbox = LetterboxSettings.from_dict(manifest["preprocess"])
        self.layout = manifest["input"].get("layout", "NCHW")
        self.output = manifest["output"]
        self.names = manifest["names"]
        self.conf, self.iou, self.max_det = check_thresholds(conf, iou, max_det)
        self._local = threading.local()

    @property
    def last_times(self) -> StageTimes:
        """Stage times of this thread's last ``detect`` call."""
        return getattr(self._local, "times", None) or StageTimes()

    @last_times.setter
    def last_times(self, times: StageTimes) -> None:
        self._local.times = times

    @property
    def info(self) -> dict:
        return {"target": self.bundle.target["name"], **self.engine.info}

    def detect(self, images, conf: float | None = None, iou: float | None = None, max_det: int | None = None,
               multi_label: bool = False, agnostic: bool = False, classes=None):
        """Detect in one image (path, BGR array or PIL image) or a list of them.

        Returns ``Detections`` for one image, a list of them for a list.
        """
        conf, iou, max_det = check_thresholds(self.conf if conf is None else conf, self.iou if iou is None else iou,
                                              self.max_det if max_det is None else max_det)
        single = not isinstance(images, (list, tuple))
        results = [
            self._detect_one(as_bgr(image), conf, iou, max_det, multi_label, agnostic, classes)
            for image in ([images] if single else images)
        ]
        return results[0] if single else results

    __call__ = detect

    def stream(self, frames, depth: int = 3, conf: float | None = None, iou: float | None = None,
               max_det: int | None = None, multi_label: bool = False, agnostic: bool = False, classes=None):
        """Detect in an iterable of frames (paths, BGR arrays, PIL images), pipelined; yields ``Detections``.

        Results equal ``detect()`` on each frame, in input order. Up to ``depth`` frames are in
        flight at once, each decoded, letterboxed, inferred and post-processed in one of ``depth``
        worker threads over the thread-safe ``detect`` path (see ``runtime.pipeline``), so one
        frame's host work overlaps another's inference. Engines with an asynchronous queue
        (OpenVINO: THROUGHPUT hint, ``depth`` requests) infer frames while this thread decodes,
        letterboxes and post-processes others. Stop early by closing the generator (or
        breaking out of a ``for``): pending frames are dropped and the workers joined.
        """
        from .pipeline import check_depth, ordered_async, ordered_map

        depth = check_depth(depth)  # now, not at the first next()
        conf, iou, max_det = check_thresholds(self.conf if conf is None else conf, self.iou if iou is None else iou,
                                              self.max_det if max_det is None else max_det)
        options = (conf, iou, max_det, multi_label, agnostic, classes)
        if hasattr(self.engine, "async_queue"):  # OpenVINO: its own request queue, host work here
            return ordered_async(lambda frame: self._prepare(as_bgr(frame)), lambda: self.engine.async_queue(depth),
                                 lambda raw, info: self._finish(raw, info, *options), frames, depth)

        def work(frame) -> Detections:
            return self._detect_one(as_bgr(frame), *options)

        return ordered_map(work, frames, depth)

    def _detect_one(self, image, conf, iou, max_det, multi_label, agnostic, classes) -> Detections:
        t0 = time.perf_counter()
        batch, info = self._prepare(image)
        t1 = time.perf_counter()
        raw = self.engine.infer(batch)
        t2 = time.perf_counter()
        dets = self._finish(raw, info, conf, iou, max_det, multi_label, agnostic, classes)
        t3 = time.perf_counter()
        self.last_times = StageTimes(preprocess=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
        return dets

    def _prepare(self, image):
        """BGR image → (engine input, letterbox info)."""
        boxed, info = letterbox(image, self.letterbox)
        return to_input(boxed, self.layout), info

    def _finish(self, raw, info, conf, iou, max_det, multi_label, agnostic, classes) -> Detections:
        """Engine output → ``Detections`` in the original image's coordinates."""
        pred = self.decode(raw, info.input_hw)[0]
        rows = non_max_suppression(
            pred, conf, iou, max_det, multi_label=multi_label, agnostic=agnostic, classes=classes,
        )
        rows[:, :4] = scale_boxes(rows[:, :4], info)
        return Detections.from_rows(rows, self.names, image_hw=info.orig_hw)

    def decode(self, raw: np.ndarray, input_hw) -> np.ndarray:
        """The engine's output in YOLOv5's decoded layout (boxes in input pixels)."""
        raw = np.asarray(raw, dtype=np.float32)
        if self.output["head"] == "sigmoid":
            return decode_sigmoid_head(raw, input_hw, self.output["strides"], self.output["anchors"])
        return raw


def check_thresholds(conf, iou, max_det) -> tuple[float, float, int]:
    """Refuse thresholds that would silently return nothing or drop boxes (``nan``, negative ``max_det``)."""
    from ..errors import EdgeYoloError

    for name, value in (("conf", conf), ("iou", iou)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise EdgeYoloError(f"{name} must be a number between 0 and 1, not {value!r}")
    if isinstance(max_det, bool) or not isinstance(max_det, numbers.Integral) or max_det < 1:
        raise EdgeYoloError(f"max_det must be a positive integer, not {max_det!r}")
    return float(conf), float(iou), int(max_det)


def load(bundle: str | Path | Bundle, verify: bool = True, conf: float = 0.25, iou: float = 0.45,
         max_det: int = 300, **engine_options) -> Detector:
    """Open a bundle folder and return its ``Detector`` (checksums verified first)."""
    from ..backends import backend_module

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, verify=verify)
    backend = backend_module(engine_options.pop("backend", None) or bundle.backend)
    engine = backend.Engine(bundle, **engine_options)
    return Detector(bundle, engine, conf=conf, iou=iou, max_det=max_det)
