"""Re-estimate BatchNorm statistics after pruning: the cheapest recovery there is.

A pruned channel rarely outputs zero: with a small BatchNorm scale it still outputs the
constant ``act(beta)``, which the next layer had learnt to expect. Removing it shifts the
next layer's pre-BatchNorm mean, and the stored running mean no longer fits; on YOLOv5n
pruning 10 % of the channels by L1 drops bus.jpg's best score from 0.82 to 0.05. A few
forward passes over unlabelled images in train mode (no gradients, no optimiser) measure
the new means and variances again: the same 10 % model scores 0.76.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by the plain average over ``batches``
    (float NCHW tensors in 0..1); returns the number of images seen. The model ends in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch, not an exponential one
    model.train()
    seen = 0
    try:
        for batch in batches:
            model(batch)
            seen += int(batch.shape[0])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return seen


def letterboxed_batches(letterboxed: list[np.ndarray], batch: int = 8) -> Iterable[torch.Tensor]:
    """Letterboxed BGR uint8 images (a ``CalibrationSet``'s) → float RGB NCHW batches in 0..1."""
    for start in range(0, len(letterboxed), batch):
        chunk = np.stack([image[:, :, ::-1].transpose(2, 0, 1) for image in letterboxed[start:start + batch]])
        yield torch.from_numpy(np.ascontiguousarray(chunk)).float().div_(255.0)
