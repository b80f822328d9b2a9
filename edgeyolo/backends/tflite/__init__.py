"""TFLite for ARM devices: onnx2tf converts at build time, LiteRT runs the model on the device.

The two halves never meet: ``build`` (``convert``) drives tensorflow in a separate converter
process, and ``Engine`` (``engine``) needs only ``ai-edge-litert`` and numpy.
"""

from .convert import build
from .engine import Engine

__all__ = ["build", "Engine"]
