"""Our own PyTorch YOLOv5, safe checkpoint reading and weight names."""

from .._optional import require

require("torch", extra="export", purpose="reading checkpoints")  # one line, not a traceback, without it

from .blocks import HEAD_DECODED, HEAD_MODES, HEAD_SIGMOID
from .checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .weights import resolve_weights
from .yolo import Model


def load_model(spec) -> LoadedCheckpoint:
    """Weights by path or official name → a float32 ``Model`` in eval mode."""
    return load_checkpoint(resolve_weights(spec))


__all__ = [
    "HEAD_DECODED", "HEAD_MODES", "HEAD_SIGMOID", "LoadedCheckpoint", "Model",
    "load_checkpoint", "load_model", "resolve_weights", "save_checkpoint",
]
