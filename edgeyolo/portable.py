"""Compiling a portable bundle on the device (``edgeyolo build BUNDLE``): no torch, no export.

Kept apart from ``edgeyolo.build``, which imports the model and exporter (torch) at the
top, so a Jetson with only the runtime and one backend installed can compile its engine.
"""

from __future__ import annotations

from pathlib import Path

from .backends import backend_module
from .bundle import load_bundle
from .errors import EdgeYoloError
from .runtime.preprocess import LetterboxSettings


def compile_portable(path, calib=None, calib_size=None, calib_seed: int = 0) -> Path:
    """Compile a portable bundle's engine on this device (backends that defer their build, e.g. TensorRT).

    ``calib`` feeds backends that calibrate on the device (TensorRT < 10.1's implicit INT8),
    letterboxed with the bundle's own preprocessing.
    """
    bundle = load_bundle(path)
    backend = backend_module(bundle.backend)
    if not hasattr(backend, "compile_bundle"):
        raise EdgeYoloError(f"{path}: already built for {bundle.target['name']}; nothing to compile on this device")
    if calib is None:
        return backend.compile_bundle(bundle)
    from .calibration import load_calibration

    letterbox = LetterboxSettings.from_dict(bundle.manifest["preprocess"])
    calibration = load_calibration(calib, letterbox, size=calib_size, seed=calib_seed)
    return backend.compile_bundle(bundle, calibration=calibration)
