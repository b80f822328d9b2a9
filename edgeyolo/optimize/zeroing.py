"""The "common advice" baseline: zero the smallest weights of every convolution, keep every channel.

This is what upstream YOLOv5's ``utils.torch_utils.prune()`` does (per-layer L1 unstructured
pruning through ``torch.nn.utils.prune``). The tensors keep their shapes, so dense kernels do
exactly the same work: no speed-up, and accuracy falls with nothing to recover it. It exists
here to be measured next to structured pruning, not to be used.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune as torch_prune


def zero_smallest(model: nn.Module, amount: float = 0.3) -> nn.Module:
    """Zero ``amount`` of the weights of every ``Conv2d`` (smallest magnitude first), in place."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), not {amount}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            torch_prune.l1_unstructured(module, name="weight", amount=amount)
            torch_prune.remove(module, "weight")  # make the zeros permanent, drop the mask
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of convolution weights that are exactly zero."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights)) / max(total, 1)


