"""Our own PyTorch YOLOv5, safe checkpoint reading and weight names."""

from .._optional import require

require("torch", extra="export", purpose="reading checkpoints")  # one line, not a traceback, without it

from .blocks import HEAD_DECODED, HEAD_MODES, HEAD_SIGMOID
from .cfg import build_from_cfg
from .checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .native import NativeCheckpoint, is_native_checkpoint, load_native, save_model
from .weights import resolve_weights
from .yolo import Model


def load_model(spec) -> LoadedCheckpoint:
    """Weights by path or official name → a float32 ``Model`` in eval mode.

    Our own ``.safetensors`` checkpoints and ultralytics ``.pt`` files are both accepted.
    """
    path = resolve_weights(spec)
    if is_native_checkpoint(path):
        return load_native(path)
    return load_checkpoint(path)


__all__ = [
    "HEAD_DECODED", "HEAD_MODES", "HEAD_SIGMOID", "LoadedCheckpoint", "Model", "NativeCheckpoint",
    "build_from_cfg", "is_native_checkpoint", "load_checkpoint", "load_model", "load_native",
    "resolve_weights", "save_checkpoint", "save_model",
]
