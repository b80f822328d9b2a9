"""Params and GFLOPs of a model, counted the way YOLOv5 reports them (GFLOPs = 2 × multiply-adds)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Size:
    params: int
    gflops: float  # at the image size it was counted for

    def __str__(self) -> str:
        return f"{self.params / 1e6:.3f} M params, {self.gflops:.2f} GFLOPs"


COUNT_SIZE = 160  # conv FLOPs scale with the area exactly, so count on a small image and scale up


def model_size(model: nn.Module, imgsz: int = 640) -> Size:
    """Parameters and GFLOPs of one ``imgsz``² image (the model's mode is restored)."""
    count = COUNT_SIZE if imgsz % COUNT_SIZE == 0 else imgsz
    import torch_pruning as tp

    counted = _without_activations(model).eval()
    device = next(model.parameters()).device
    macs, params = tp.utils.count_ops_and_params(counted, torch.zeros(1, 3, count, count, device=device))
    return Size(params=int(params), gflops=2 * float(macs) / 1e9 * (imgsz / count) ** 2)


ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Sigmoid)


def _without_activations(model: nn.Module) -> nn.Module:
    """A copy whose activations are identities: torch-pruning's counter charges ReLU one op per element
    but SiLU none, which made a ReLU swap look 30 % heavier; YOLOv5 (thop) counts neither."""
    counted = copy.deepcopy(model)
    for module in list(counted.modules()):
        for name, child in module.named_children():
            if isinstance(child, ACTIVATIONS):
                setattr(module, name, nn.Identity())
    return counted
