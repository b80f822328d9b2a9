"""Detection on a video file or a camera: frames in, annotated frames (with the measured FPS) out."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from .errors import EdgeYoloError


class FpsMeter:
    """Frames per second of the detection loop, smoothed over the last frames (what a viewer sees)."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.fps = 0.0
        self.frames = 0
        self.seconds = 0.0
        self._last = None

    def tick(self) -> float:
        now = time.perf_counter()
        if self._last is not None:
            dt = max(now - self._last, 1e-9)
            self.seconds += dt
            self.fps = 1 / dt if self.fps == 0 else self.smoothing * self.fps + (1 - self.smoothing) / dt
        self._last = now
        self.frames += 1
        return self.fps

    @property
    def average(self) -> float:
        return (self.frames - 1) / self.seconds if self.seconds else 0.0


def draw_fps(image: np.ndarray, fps: float) -> np.ndarray:
    """Write ``FPS n`` in the top-left corner, white on black so it reads on any frame."""
    height, width = image.shape[:2]
    scale = max(0.5, (height + width) / 2000)
    thickness = max(1, round(scale * 2))
    text = f"FPS {fps:.1f}"
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(image, (0, 0), (min(tw + 8, width - 1), min(th + baseline + 8, height - 1)), (0, 0, 0), -1)
    cv2.putText(image, text, (4, 4 + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


class VideoOut:
    """An mp4 written frame by frame; opened on the first frame (its size is the video's)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self._writer = Path(path), fps, None

    def write(self, frame: np.ndarray) -> None:
        if self._writer is None:
            height, width = frame.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self._writer.isOpened():
                raise EdgeYoloError(f"{self.path}: OpenCV cannot write an mp4 video here")
        self._writer.write(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_capture(source) -> cv2.VideoCapture:
    """A capture for a video file (a path) or a camera (an int index)."""
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not capture.isOpened():
        capture.release()
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise EdgeYoloError(f"{what}: cannot be opened as a video source")
    return capture


def frames(capture: cv2.VideoCapture):
    """Yield (index, BGR frame) until the source ends."""
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield index, frame
        index += 1


def source_fps(capture: cv2.VideoCapture) -> float:
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if fps and 0 < fps < 1000 else 30.0
