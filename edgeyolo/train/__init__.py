"""The training engine: hyper-parameters, YOLOv5's loss, safetensors checkpoints (and the trainer)."""

from .hyp import DEFAULT_HYP, load_hyp

__all__ = ["DEFAULT_HYP", "load_hyp"]
