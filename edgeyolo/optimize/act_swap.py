"""Rebuild a model with another activation, keeping every weight (the start of an act-swap recovery).

The swap changes what the weights compute (SiLU's negative dip is gone under ReLU), so the
swapped model needs recovery — distillation from the original is what ``edgeyolo distill --act``
does. ReLU-family activations are what many NPUs and INT8 kernels fuse best.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import EdgeYoloError
from ..model.blocks import Conv
from ..model.yolo import parse_activation

# CLI name → the activation spec a checkpoint records (parse_activation reads it back).
ACT_CHOICES = {
    "relu": "ReLU",
    "relu6": "ReLU6",
    "leakyrelu": "LeakyReLU(0.1)",
    "hardswish": "Hardswish",
    "silu": "SiLU",
}


def activation_spec(name: str) -> str:
    try:
        return ACT_CHOICES[name.lower()]
    except KeyError:
        raise EdgeYoloError(f"--act must be one of {', '.join(ACT_CHOICES)}, not {name!r}") from None


def swap_activation(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` whose every activated ``Conv`` uses ``name`` (layers without one keep none)."""
    spec = activation_spec(name)
    swapped = copy.deepcopy(model)
    for module in swapped.modules():
        if isinstance(module, Conv) and not isinstance(module.act, nn.Identity):
            module.act = parse_activation(spec)
    if isinstance(getattr(swapped, "yaml", None), dict):
        swapped.yaml["activation"] = f"nn.{spec}"
    return swapped
