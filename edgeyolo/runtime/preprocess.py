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


def letterbox(image: np.ndarray, settings: LetterboxSettings) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping aspect ratio and pad with grey, centred, exactly as YOLOv5's ``letterbox``."""
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
    if (w0, h0) != (unpad_w, unpad_h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    color = (settings.color,) * 3
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return image, LetterboxInfo(orig_hw=(h0, w0), ratio=r, pad=(dw, dh), input_hw=image.shape[:2])


def to_input(letterboxed: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """BGR uint8 HWC → RGB float32 in 0..1, batch of one, in ``layout`` (NCHW or NHWC)."""
    rgb = letterboxed[:, :, ::-1]
    if layout == "NCHW":
        rgb = rgb.transpose(2, 0, 1)
    return np.ascontiguousarray(rgb, dtype=np.float32)[None] / np.float32(255.0)


def preprocess(image: np.ndarray, settings: LetterboxSettings, layout: str = "NCHW"):
    """BGR uint8 image → (network input batch of one, letterbox info)."""
    boxed, info = letterbox(image, settings)
    return to_input(boxed, layout), info
