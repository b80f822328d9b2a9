"""What ships on a device: preprocess, decode, NMS, ``Detector``, ``Detections``. Never imports torch."""

from .detections import Detections
from .detector import Detector, StageTimes, load
from .images import as_bgr, read_image
from .preprocess import (
    LetterboxInfo,
    LetterboxSettings,
    letterbox,
    preprocess,
    to_input,
)

__all__ = [
    "Detections", "Detector", "LetterboxInfo", "LetterboxSettings", "StageTimes", "as_bgr", "letterbox", "load",
    "preprocess", "read_image", "to_input",
]
