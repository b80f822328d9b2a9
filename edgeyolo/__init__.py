"""edgeyolo: compile YOLOv5 detectors for edge hardware and run them with one ``detect()`` call.

``import edgeyolo`` stays light (no torch): the runtime is what ships on a device.
"""

from ._version import __version__
from .errors import EdgeYoloError


def load(bundle, **options):
    """Open a bundle folder and return its ``Detector``; see ``edgeyolo.runtime.load``."""
    from .runtime import load as _load

    return _load(bundle, **options)


__all__ = ["EdgeYoloError", "__version__", "load"]
