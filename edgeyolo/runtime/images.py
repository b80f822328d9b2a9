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
    return read_image_reduced(path, None)[0]


def read_image_reduced(path: str | Path, fit_hw: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image file as BGR uint8, a JPEG at 1/2 or 1/4 scale when it is far larger than ``fit_hw``.

    Returns (image, the file's full (height, width)). A JPEG whose size, from its header, is
    at least k times (k = 4, then 2) what a letterbox into ``fit_hw`` keeps is decoded at 1/k
    by libjpeg itself (``IMREAD_REDUCED_COLOR_k``): the letterbox then only shrinks it further,
    so no detail the network would have seen is lost, and decoding is several times faster.
    ``fit_hw=None`` always decodes in full.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeYoloError(f"{path}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise EdgeYoloError(f"{path}: larger than {MAX_IMAGE_BYTES >> 20} MB; not an image we read")
    data = np.fromfile(str(path), dtype=np.uint8)
    full_hw = jpeg_size(data) if fit_hw is not None else None
    factor = reduction(full_hw, fit_hw) if full_hw else 1
    try:  # OpenCV refuses headers claiming more than its pixel limit (2^30) before allocating
        image = cv2.imdecode(data, REDUCED_FLAGS[factor]) if data.size else None
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1][:120]
        raise EdgeYoloError(f"{path}: not a readable image ({reason})") from None
    if image is None:
        raise EdgeYoloError(f"{path}: not a readable image")
    image = to_bgr_uint8(image)
    return image, (full_hw if factor > 1 else image.shape[:2])


# k -> imdecode flags; reduced reads keep the file's own orientation, as IMREAD_UNCHANGED does
REDUCED_FLAGS = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
                 4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION}
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def reduction(full_hw: tuple[int, int], fit_hw: tuple[int, int]) -> int:
    """The largest k in (4, 2) with the image at least k times its letterboxed size, else 1."""
    ratio = min(fit_hw[0] / full_hw[0], fit_hw[1] / full_hw[1])
    return next((k for k in (4, 2) if ratio * k <= 1.0), 1)


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walking its segments; None if not a JPEG we can read."""
    buf = data[:1 << 20].tobytes()
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            height, width = int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
            return (height, width) if height and width else None
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


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
