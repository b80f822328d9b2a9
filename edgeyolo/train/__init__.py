"""The training engine: hyper-parameters, YOLOv5's loss, safetensors checkpoints (and the trainer)."""

from .hyp import DEFAULT_HYP, load_hyp
from .loss import YoloLoss

__all__ = ["DEFAULT_HYP", "YoloLoss", "load_hyp"]
