"""Sparsity training (network slimming, Liu et al. 2017): L1 on BatchNorm scales prepares a model
for ``edgeyolo prune --importance bn``, pushing unneeded channels' scales towards zero."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..train.trainer import Trainer


def add_bn_l1_grad(model: nn.Module, strength: float, grad_scale: float = 1.0) -> None:
    """Add the subgradient of ``strength · Σ|γ|`` to every BatchNorm scale's gradient."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.weight.grad is not None:
            module.weight.grad.add_(torch.sign(module.weight.detach()), alpha=strength * grad_scale)


def bn_l1(model: nn.Module) -> float:
    """Σ|γ| over the BatchNorm scales (falls while sparsity training works)."""
    return float(sum(m.weight.detach().abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)))


class SparsityTrainer(Trainer):
    """The Trainer with an L1 penalty on BatchNorm scales (``edgeyolo train --sparsity S``), added to
    the unscaled gradients at every optimiser step (``TrainConfig.sparsity``, kept for ``--resume``)."""

    def __init__(self, config, strength: float, **kwargs):
        super().__init__(dataclasses.replace(config, sparsity=strength), **kwargs)
