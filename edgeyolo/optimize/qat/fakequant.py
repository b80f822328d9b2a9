"""Fake quantisers with the deployed arithmetic (ONNX Runtime's QDQ format, TensorRT's explicit INT8).

Activations: per-tensor, stored as uint8 around zero point 128 when symmetric (``quantize.py``), so
``q = clamp(round(x / s) + 128, 0, 255)``; an asymmetric graph's own zero point takes 128's place.
The scale is learned LSQ-style (Esser et al., 2020): rounding passes the gradient straight
through, the clamp and the scale do not, so the scale receives the gradient of both its rounding
and its clipping error. It is parametrised as
``initial · exp(g)``: it stays positive, Adam steps are relative, and before any step it is the
calibrated float32 scale bit for bit (rounding ties depend on that last bit).

Weights: per output channel symmetric int8 in [-127, 127] with ``s = max|w| / 127``, the formula
the quantiser applies when the graph is written, so the trained rounding is the deployed one.
"""

from __future__ import annotations

import torch
from torch import nn

ACT_ZERO_POINT, ACT_QMIN, ACT_QMAX = 128, 0, 255
WEIGHT_QMAX = 127


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class ActivationQuantizer(nn.Module):
    """One QuantizeLinear→DequantizeLinear pair: uint8, its zero point (128: symmetric), a learnable scale."""

    def __init__(self, scale: float, learnable: bool = True, zero_point: int = ACT_ZERO_POINT):
        super().__init__()
        self.zero_point = int(zero_point)
        self.register_buffer("initial", torch.tensor(scale, dtype=torch.float32))
        self.log_gain = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=learnable)

    @property
    def scale(self) -> torch.Tensor:
        return self.initial * self.log_gain.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if not torch.is_grad_enabled():  # calibration, re-fit, sensitivity: the same values, in place
            return _quantize_in_place(x / s, s, self.zero_point)
        q = torch.clamp(round_ste(x / s) + self.zero_point, ACT_QMIN, ACT_QMAX)
        return (q - self.zero_point) * s


def _quantize_in_place(scaled: torch.Tensor, s: torch.Tensor, zero_point: int) -> torch.Tensor:
    """``forward`` without autograd, bit for bit: ``round_ste`` rounds exactly (x + (round(x) - x) is
    round(x) in float, the difference being exact), and each step overwrites one buffer instead of
    allocating five; a 640x640 graph runs thousands of these per re-fit."""
    scaled.round_().add_(zero_point).clamp_(ACT_QMIN, ACT_QMAX).sub_(zero_point)
    return scaled.mul_(s)


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale, shaped to broadcast over the weight."""
    amax = weight.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
    return (amax / WEIGHT_QMAX).view(-1, *([1] * (weight.dim() - 1)))


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    s = weight_scale(weight)
    return torch.clamp(round_ste(weight / s), -WEIGHT_QMAX, WEIGHT_QMAX) * s
