"""Optional packages: import them, or fail with one line that names the extra installing them.

The runtime needs numpy, OpenCV and one backend; everything else (torch, onnx, the
converters, the COCO evaluator, supervision) comes with an extra. A missing one is bad
input from the user's install, not a bug: ``EdgeYoloError`` (one line, exit status 2).
"""

from __future__ import annotations

import importlib

from .errors import EdgeYoloError

# top-level import name -> (distribution to name in the message, extra that installs it)
PACKAGES = {
    "torch": ("torch", "export"),
    "onnx": ("onnx", "export"),
    "onnxslim": ("onnxslim", "export"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "faster_coco_eval": ("faster-coco-eval", "eval"),
    "yaml": ("pyyaml", "eval"),
    "openvino": ("openvino", "openvino"),
    "nncf": ("nncf", "openvino"),
    "ai_edge_litert": ("ai-edge-litert", "litert"),
    "onnx2tf": ("onnx2tf", "tflite"),
    "tensorflow": ("tensorflow", "tflite"),
    "tf_keras": ("tf-keras", "tflite"),
    "onnx_graphsurgeon": ("onnx-graphsurgeon", "tflite"),
    "sng4onnx": ("sng4onnx", "tflite"),
    "cuda": ("cuda-python", "tensorrt"),
    "supervision": ("supervision", "supervision"),
}


def install_command(module: str, extra: str | None = None) -> str:
    """``pip install 'edgeyolo[extra]'`` for a known package, else ``pip install package``."""
    package, known_extra = PACKAGES.get(module.split(".")[0], (module.split(".")[0], None))
    extra = extra or known_extra
    return f"pip install 'edgeyolo[{extra}]'" if extra else f"pip install {package}"


def missing_message(module: str, extra: str | None = None, purpose: str | None = None) -> str:
    """The one line for a missing ``module``: which package, which extra, the pip command."""
    package, known_extra = PACKAGES.get(module.split(".")[0], (module.split(".")[0], None))
    extra = extra or known_extra
    source = f" from the '{extra}' extra" if extra else ""
    return f"{purpose or 'this'} needs the '{package}' package{source}: {install_command(module, extra)}"


def require(module: str, extra: str | None = None, purpose: str | None = None):
    """Import ``module`` and return it, or raise ``EdgeYoloError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only a missing ``module`` is the user's install; another missing module inside it is a bug, shown as is.
        if exc.name and exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise EdgeYoloError(missing_message(module, extra, purpose)) from None
    except ImportError as exc:
        raise EdgeYoloError(f"{module} is installed but cannot be imported ({exc}); "
                            f"reinstall it: {install_command(module, extra)}") from None


def known_missing(exc: BaseException) -> str | None:
    """For a ``ModuleNotFoundError`` of a known optional package, its one line; else ``None``."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    root = exc.name.split(".")[0]
    return missing_message(root) if root in PACKAGES else None
