"""Letterbox preprocessing, identical to YOLOv5's. Calibration, evaluation and detect() all use it."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_COLOR = 114


@dataclass(frozen=True)
class LetterboxSettings:
    """How an image becomes a network input (stored in every bundle's manifest)."""

    imgsz: tuple[int, int] = (640, 640)
    auto: bool = False  # minimal padding to a multiple of ``stride`` (dynamic-shape engines only)
    stride: int = 32
    scaleup: bool = True
    color: int = PAD_COLOR

    def to_dict(self) -> dict:
        return {"imgsz": list(self.imgsz), "auto": self.auto, "stride": self.stride, "scaleup": self.scaleup,
                "color": self.color, "interpolation": "linear", "channel_order": "RGB", "scale": "1/255"}

    @classmethod
    def from_dict(cls, data: dict) -> "LetterboxSettings":
        return cls(imgsz=tuple(data["imgsz"]), auto=bool(data.get("auto", False)), stride=int(data.get("stride", 32)),
                   scaleup=bool(data.get("scaleup", True)), color=int(data.get("color", PAD_COLOR)))


@dataclass(frozen=True)
class LetterboxInfo:
    """What the letterbox did, so boxes can be mapped back to the original image."""

    orig_hw: tuple[int, int]
    ratio: float
    pad: tuple[float, float]  # (left, top), fractional as YOLOv5 keeps it
    input_hw: tuple[int, int]


def letterbox(image: np.ndarray, settings: LetterboxSettings,
              canvas: "LetterboxCanvas | None" = None) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping aspect ratio and pad with grey, centred, exactly as YOLOv5's ``letterbox``.

    With ``canvas`` (fixed-size inputs only) the result is written into its reused buffer,
    resized in place, and only re-padded when the geometry changes (as it rarely does in a
    video); the returned array is that buffer, valid until the canvas's next use.
    """
    h0, w0 = image.shape[:2]
    new_h, new_w = settings.imgsz
    r = min(new_h / h0, new_w / w0)
    if not settings.scaleup:
        r = min(r, 1.0)
    unpad_w, unpad_h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if settings.auto:
        dw, dh = dw % settings.stride, dh % settings.stride
    dw, dh = dw / 2, dh / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if canvas is not None and not settings.auto:
        boxed = canvas.place(image, (unpad_h, unpad_w), (top, left, bottom, right), settings.color)
        return boxed, LetterboxInfo(orig_hw=(h0, w0), ratio=r, pad=(dw, dh), input_hw=boxed.shape[:2])
    if (w0, h0) != (unpad_w, unpad_h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    color = (settings.color,) * 3
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return image, LetterboxInfo(orig_hw=(h0, w0), ratio=r, pad=(dw, dh), input_hw=image.shape[:2])


class LetterboxCanvas:
    """One reused letterbox buffer (and float input buffer). Not thread-safe: one per thread.

    Saves an allocation and a full copy per frame: the resize writes straight into the
    buffer's centre, and the grey border is refilled only when the image's geometry changes.
    """

    def __init__(self):
        self.buffer: np.ndarray | None = None
        self.geometry = None
        self.inputs: dict = {}

    def place(self, image: np.ndarray, unpad_hw, border, color: int) -> np.ndarray:
        top, left, bottom, right = border
        shape = (unpad_hw[0] + top + bottom, unpad_hw[1] + left + right, 3)
        if self.buffer is None or self.buffer.shape != shape:
            self.buffer, self.geometry = np.empty(shape, np.uint8), None
        if self.geometry != (unpad_hw, border, color):
            self.buffer[...] = color
            self.geometry = (unpad_hw, border, color)
        inner = self.buffer[top:top + unpad_hw[0], left:left + unpad_hw[1]]
        if image.shape[:2] == tuple(unpad_hw):
            inner[...] = image
        else:
            resized = cv2.resize(image, (unpad_hw[1], unpad_hw[0]), dst=inner, interpolation=cv2.INTER_LINEAR)
            if resized.ctypes.data != inner.ctypes.data:  # OpenCV chose its own array after all
                inner[...] = resized
        return self.buffer

    def input_buffer(self, shape) -> np.ndarray:
        """A reused float32 array of ``shape`` for ``to_input(..., out=)``."""
        if shape not in self.inputs:
            self.inputs = {shape: np.empty(shape, np.float32)}
        return self.inputs[shape]


def input_shape(letterboxed: np.ndarray, layout: str = "NCHW") -> tuple[int, int, int, int]:
    h, w = letterboxed.shape[:2]
    return (1, 3, h, w) if layout == "NCHW" else (1, h, w, 3)


def to_input(letterboxed: np.ndarray, layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HWC → RGB float32 in 0..1, batch of one, in ``layout`` (NCHW or NHWC).

    One pass: each channel is divided straight into its place (the values are exactly
    ``float32(x) / 255``), into ``out`` when given (a reused buffer of the right shape).
    """
    if out is None:
        out = np.empty(input_shape(letterboxed, layout), np.float32)
    scale = np.float32(255.0)
    if layout == "NCHW":
        for c in range(3):
            np.divide(letterboxed[:, :, 2 - c], scale, out=out[0, c], dtype=np.float32)
    else:
        np.divide(letterboxed[:, :, ::-1], scale, out=out[0], dtype=np.float32)
    return out


def preprocess(image: np.ndarray, settings: LetterboxSettings, layout: str = "NCHW"):
    """BGR uint8 image → (network input batch of one, letterbox info)."""
    boxed, info = letterbox(image, settings)
    return to_input(boxed, layout), info
