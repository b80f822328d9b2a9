"""Backends: one module each, the same small interface (as Polygraphy's loader/runner pairs).

Each backend module provides

- ``build(onnx_path, target, out_dir, calibration) -> BuildResult``: write the engine
  files into ``out_dir`` (a bundle's temporary folder), from the one ONNX;
- ``Engine(bundle, **options)`` with ``infer(batch) -> np.ndarray`` (the head output,
  ``(B, N, 5+nc)`` float32) and ``info`` (a dict describing the running engine).

Heavy packages are imported inside those functions, so listing or importing a backend
module costs nothing and a missing package is reported with the extra that installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from .._optional import require as _require
from ..errors import EdgeYoloError

# backend name -> (module, pip extra that installs what it needs)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("edgeyolo.backends.onnxruntime", "onnxruntime"),
    "openvino": ("edgeyolo.backends.openvino", "openvino"),
    "tflite": ("edgeyolo.backends.tflite", "litert"),
    "tensorrt": ("edgeyolo.backends.tensorrt", "tensorrt"),
}


@dataclass
class BuildResult:
    """What a backend's ``build`` produced: file roles → names in the bundle, and facts for the manifest."""

    files: dict[str, str]
    info: dict = field(default_factory=dict)
    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise EdgeYoloError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name][0])


def require(package: str, backend: str):
    """Import ``package`` or fail with one line naming the extra to install."""
    extra = BACKENDS.get(backend, (None, backend))[1]
    return _require(package, extra=extra, purpose=f"the {backend} backend")
