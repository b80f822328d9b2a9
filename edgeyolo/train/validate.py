"""Per-epoch validation of the torch model, through the very code ``edgeyolo eval`` runs.

The model is wrapped as an engine of the runtime's ``Detector`` (same letterbox, decode, NMS
with val settings: conf 0.001, IoU 0.6, multi-label, max_det 300) and scored by
``edgeyolo.evaluate.evaluate`` (same COCO metric), so its mAP is what ``eval`` reports for a
bundle built from the checkpoint at the same input size, up to export numerics.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from ..datasets import Dataset
from ..evaluate import EvalResult, evaluate
from ..model import HEAD_DECODED
from ..runtime.detector import Detector
from ..runtime.preprocess import LetterboxSettings
from .ema import unwrap


class TorchEngine:
    """A torch ``Model`` (decoded head) behind the runtime's engine interface."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.info = {"backend": "torch", "device": str(device)}

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


def torch_detector(model: torch.nn.Module, imgsz: int, device: torch.device) -> Detector:
    model = unwrap(model)
    manifest = {"preprocess": LetterboxSettings(imgsz=(imgsz, imgsz)).to_dict(), "input": {"layout": "NCHW"},
                "output": {"head": HEAD_DECODED}, "names": list(model.names)}
    bundle = SimpleNamespace(manifest=manifest, target={"name": "torch"})
    return Detector(bundle, TorchEngine(model, device))


def validate(model: torch.nn.Module, dataset: Dataset, imgsz: int, device: torch.device,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """COCO mAP50-95 / mAP50 of ``model`` on ``dataset`` (fractions 0–1); the model's mode is restored."""
    model = unwrap(model)
    was_training, head_mode = model.training, model.head_mode
    model.eval()
    model.head_mode = HEAD_DECODED
    try:
        return evaluate(torch_detector(model, imgsz, device), dataset, progress=progress)
    finally:
        model.head_mode = head_mode
        model.train(was_training)
