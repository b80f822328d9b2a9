"""``Detector``: a bundle's engine wrapped in YOLOv5's pre- and post-processing."""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import Bundle, load_bundle
from .detections import Detections
from .images import as_bgr, read_image_reduced
from .postprocess import (
    head_candidates,
    non_max_suppression,
    rescale_boxes,
    scale_boxes,
)
from .preprocess import (
    LetterboxCanvas,
    LetterboxSettings,
    input_shape,
    letterbox,
    to_input,
)

# Opt-in: image files far larger than the input decoded at 1/2 or 1/4 scale (images.read_image_reduced).
# On coco-val-500 at a 320 input (every 640-wide image read at 1/2): mAP50-95 +0.08 but mAP50 -0.14,
# and boxes no longer match upstream detect.py's to float precision (zidane.jpg at 640), so off by default.
REDUCED_DECODE = False


@dataclass
class StageTimes:
    """Seconds spent per stage by the last ``detect`` call (read by ``bench``).

    ``read`` is decoding the image (zero for an array); ``preprocess`` = ``letterbox`` +
    ``to_input``; ``postprocess`` = ``decode`` (head rows → boxes) + ``nms`` + ``scale``
    (boxes back to the caller's image). ``host`` is everything but ``inference``.
    """

    read: float = 0.0
    letterbox: float = 0.0
    to_input: float = 0.0
    inference: float = 0.0
    decode: float = 0.0
    nms: float = 0.0
    scale: float = 0.0
    extra: dict = field(default_factory=dict)

    FINE = ("read", "letterbox", "to_input", "inference", "decode", "nms", "scale")

    @property
    def preprocess(self) -> float:
        return self.letterbox + self.to_input

    @property
    def postprocess(self) -> float:
        return self.decode + self.nms + self.scale

    @property
    def host(self) -> float:
        return self.read + self.preprocess + self.postprocess


class Detector:
    """Detect objects with one bundle's engine; ``detect()`` is all most callers need.

    With ``reduced_decode=True``, image *paths* at least twice as large as what the letterbox
    keeps are decoded at reduced scale (boxes still in the file's full size). One ``Detector`` may
    be shared by several threads: pre- and post-processing keep per-thread buffers only,
    ``last_times`` is per thread, and each backend's engine is thread-safe in its own way
    (ONNX Runtime's session is; OpenVINO lends each call an infer request from a pool; LiteRT's
    interpreter runs one call at a time under a lock). Results equal those of serial calls.
    """

    def __init__(self, bundle: Bundle, engine, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
                 reduced_decode: bool = REDUCED_DECODE):
        self.bundle = bundle
        self.engine = engine
        manifest = bundle.manifest
        self.letterbox = LetterboxSettings.from_dict(manifest["preprocess"])
        self.layout = manifest["input"].get("layout", "NCHW")
        self.takes_image = is_image_input(manifest["input"])
        self.output = manifest["output"]
        self.names = manifest["names"]
        self.conf, self.iou, self.max_det = check_thresholds(conf, iou, max_det)
        self.reduced_decode = bool(reduced_decode)
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
            self._detect_one(image, conf, iou, max_det, multi_label, agnostic, classes)
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
        (OpenVINO: a ring of ``depth`` requests) infer frames while this thread decodes,
        letterboxes and post-processes others. Stop early by closing the generator (or
        breaking out of a ``for``): pending frames are dropped and the workers joined.
        """
        from .pipeline import check_depth, ordered_async, ordered_map

        depth = check_depth(depth)  # now, not at the first next()
        conf, iou, max_det = check_thresholds(self.conf if conf is None else conf, self.iou if iou is None else iou,
                                              self.max_det if max_det is None else max_det)
        options = (conf, iou, max_det, multi_label, agnostic, classes)
        if hasattr(self.engine, "async_queue"):  # OpenVINO: its own request queue, host work here
            # The engine reads each slot's input in place: one letterbox canvas per slot.
            canvases = [LetterboxCanvas() for _ in range(depth)]
            return ordered_async(lambda frame, slot: self._prepare(frame, canvases[slot])[:2],
                                 lambda: self.engine.async_queue(depth),
                                 lambda raw, context: self._finish(raw, context, *options)[0], frames, depth)

        def work(frame) -> Detections:
            return self._detect_one(frame, *options)

        return ordered_map(work, frames, depth)

    def _detect_one(self, source, conf, iou, max_det, multi_label, agnostic, classes) -> Detections:
        batch, context, (read, boxing, converting) = self._prepare(source)
        t0 = time.perf_counter()
        raw = self.engine.infer(batch)
        inference = time.perf_counter() - t0
        dets, (decode, nms, scale) = self._finish(raw, context, conf, iou, max_det, multi_label, agnostic, classes)
        self.last_times = StageTimes(read=read, letterbox=boxing, to_input=converting, inference=inference,
                                     decode=decode, nms=nms, scale=scale)
        return dets

    def _prepare(self, source, canvas: LetterboxCanvas | None = None):
        """A frame → (engine input, (letterbox info, the file's full size), read/letterbox/to_input seconds).

        The input lives in ``canvas`` (default: this thread's reused one): valid until its next frame.
        """
        t0 = time.perf_counter()
        if self.reduced_decode and isinstance(source, (str, Path)):
            image, full_hw = read_image_reduced(source, self.letterbox.imgsz)
        else:
            image = as_bgr(source)
            full_hw = image.shape[:2]
        t1 = time.perf_counter()
        canvas = canvas or self._canvas()
        boxed, info = letterbox(image, self.letterbox, canvas)
        t2 = time.perf_counter()
        if self.takes_image:  # the engine converts the letterbox itself (backends.image_input)
            batch = boxed[None]
        else:
            batch = to_input(boxed, self.layout, out=canvas.input_buffer(input_shape(boxed, self.layout)))
        t3 = time.perf_counter()
        return batch, (info, tuple(full_hw)), (t1 - t0, t2 - t1, t3 - t2)

    def _finish(self, raw, context, conf, iou, max_det, multi_label, agnostic, classes):
        """Engine output → (``Detections`` in the file's coordinates, decode/nms/scale seconds)."""
        info, full_hw = context
        t0 = time.perf_counter()
        pred = head_candidates(raw[0], conf, info.input_hw, self.output["head"], self.output.get("strides"),
                               self.output.get("anchors"))  # a decoded head has neither
        t1 = time.perf_counter()
        rows = non_max_suppression(
            pred, conf, iou, max_det, multi_label=multi_label, agnostic=agnostic, classes=classes,
        )
        t2 = time.perf_counter()
        rows[:, :4] = scale_boxes(rows[:, :4], info)
        if full_hw != tuple(info.orig_hw):
            rows[:, :4] = rescale_boxes(rows[:, :4], info.orig_hw, full_hw)
        t3 = time.perf_counter()
        return Detections.from_rows(rows, self.names, image_hw=full_hw), (t1 - t0, t2 - t1, t3 - t2)

    def _canvas(self) -> LetterboxCanvas:
        """This thread's reused letterbox and input buffers."""
        canvas = getattr(self._local, "canvas", None)
        if canvas is None:
            canvas = self._local.canvas = LetterboxCanvas()
        return canvas


def is_image_input(spec: dict) -> bool:
    """Whether the engine takes the BGR uint8 NHWC letterbox itself (else RGB float32 in 0..1, as before)."""
    from ..errors import EdgeYoloError

    dtype = spec.get("dtype", "float32")
    if dtype == "float32":
        return False
    if dtype == "uint8" and spec.get("layout") == "NHWC" and spec.get("channel_order") == "BGR":
        return True
    raise EdgeYoloError(f"this runtime cannot feed a {dtype} {spec.get('layout')} "
                        f"{spec.get('channel_order', '')} engine input; upgrade edgeyolo")


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
         max_det: int = 300, reduced_decode: bool = REDUCED_DECODE, **engine_options) -> Detector:
    """Open a bundle folder and return its ``Detector`` (checksums verified first)."""
    from ..backends import backend_module

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, verify=verify)
    backend = backend_module(engine_options.pop("backend", None) or bundle.backend)
    engine = backend.Engine(bundle, **engine_options)
    return Detector(bundle, engine, conf=conf, iou=iou, max_det=max_det, reduced_decode=reduced_decode)
