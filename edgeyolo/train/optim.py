"""Optimiser and schedule as YOLOv5 runs them: three parameter groups, warm-up, linear or cosine LR.

Groups, in upstream's order: 0 = biases (their own warm-up LR), 1 = conv weights (the only
group with weight decay), 2 = BatchNorm (and other norm) weights. Weight decay is scaled by
``batch · accumulate / nominal`` so a smaller batch with gradient accumulation matches the
nominal batch (64).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64
OPTIMIZERS = ("sgd", "adamw")


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """(decayed weights, norm weights, biases) of the trainable parameters."""
    decayed, norm, biases = [], [], []
    norms = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif isinstance(module, norms):
                norm.append(p)
            else:
                decayed.append(p)
    return decayed, norm, biases


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float):
    decayed, norm, biases = parameter_groups(model)
    if name == "sgd":
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
    optimizer.add_param_group({"params": decayed, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm, "weight_decay": 0.0})
    return optimizer


def accumulate_steps(batch: int, nominal: int = NOMINAL_BATCH) -> int:
    """Batches whose gradients add up before one optimiser step (nominal batch 64 by default)."""
    return max(round(nominal / batch), 1)


def scaled_weight_decay(weight_decay: float, batch: int, nominal: int = NOMINAL_BATCH) -> float:
    return weight_decay * batch * accumulate_steps(batch, nominal) / nominal


def lr_factor(epoch: int, epochs: int, lrf: float, cosine: bool) -> float:
    """The LR multiplier of an epoch: linear (1 → lrf) or cosine (one half cycle, 1 → lrf)."""
    if cosine:
        return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return (1 - epoch / epochs) * (1.0 - lrf) + lrf


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int) -> int:
    """Warm-up length in iterations: at least 100 (as upstream), 0 when warm-up is off."""
    return max(round(warmup_epochs * batches_per_epoch), 100) if warmup_epochs > 0 else 0


def apply_schedule(optimizer, hyp: dict, epoch: int, epochs: int, iteration: int, warmup_iters: int,
                   cosine: bool) -> None:
    """Set each group's LR (and SGD momentum during warm-up) for this iteration.

    During warm-up the bias group's LR falls from ``warmup_bias_lr`` and the others rise from 0
    to their scheduled value, and momentum rises from ``warmup_momentum`` to ``momentum``.
    After it, the LR is ``lr0 · lr_factor(epoch)``.
    """
    target = hyp["lr0"] * lr_factor(epoch, epochs, hyp["lrf"], cosine)
    warming = iteration < warmup_iters
    for j, group in enumerate(optimizer.param_groups):
        if warming:
            start = hyp["warmup_bias_lr"] if j == 0 else 0.0
            group["lr"] = float(np.interp(iteration, [0, warmup_iters], [start, target]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(iteration, [0, warmup_iters], [hyp["warmup_momentum"],
                                                                                  hyp["momentum"]]))
        else:
            group["lr"] = target
            if "momentum" in group:
                group["momentum"] = hyp["momentum"]
