"""The training engine: hyper-parameters, YOLOv5's loss, safetensors checkpoints (and the trainer)."""

from .checkpoint import TrainingState, load_training_state, save_training_state
from .hyp import DEFAULT_HYP, load_hyp
from .loss import YoloLoss

__all__ = ["DEFAULT_HYP", "TrainingState", "YoloLoss", "load_hyp", "load_training_state", "save_training_state"]
