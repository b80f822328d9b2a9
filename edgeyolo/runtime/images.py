"""Turn whatever the caller hands us (path, OpenCV array, PIL image) into a BGR uint8 array."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..errors import EdgeYoloError

MAX_IMAGE_BYTES = 512 << 20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 (grayscale, alpha and 16-bit files included)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeYoloError(f"{path}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise EdgeYoloError(f"{path}: larger than {MAX_IMAGE_BYTES >> 20} MB; not an image we read")
    data = np.fromfile(str(path), dtype=np.uint8)
    try:  # OpenCV refuses headers claiming more than its pixel limit (2^30) before allocating
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1][:120]
        raise EdgeYoloError(f"{path}: not a readable image ({reason})") from None
    if image is None:
        raise EdgeYoloError(f"{path}: not a readable image")
    return to_bgr_uint8(image)


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """Normalise an array to 3-channel BGR uint8: gray → BGR, BGRA → BGR, 16-bit/float → 8-bit."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise EdgeYoloError(f"not an image array (shape {getattr(image, 'shape', None)})")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        scale = 255.0 if image.max() <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise EdgeYoloError(f"unsupported image dtype {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise EdgeYoloError(f"unsupported channel count {image.shape[2]}")


def as_bgr(source) -> np.ndarray:
    """A path, a BGR numpy array (as OpenCV gives) or a PIL image → BGR uint8."""
    if isinstance(source, (str, Path)):
        return read_image(source)
    if isinstance(source, np.ndarray):
        return to_bgr_uint8(source)
    if hasattr(source, "convert") and hasattr(source, "mode"):  # PIL.Image, without importing PIL
        rgb = np.asarray(source.convert("RGB"))
        return np.ascontiguousarray(rgb[:, :, ::-1])
    raise EdgeYoloError(f"cannot read an image from {type(source).__name__}")
