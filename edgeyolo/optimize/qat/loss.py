"""Label-free distillation loss for QAT: the INT8 student against the FP32 graph on the same batch.

Student and teacher are the same network, so no adapters are needed and every term compares like
with like:

* **objectness**: binary KL of the sigmoid, over every anchor of every level;
* **classes**: binary KL per class, weighted by the teacher's objectness (where a box is);
* **boxes**: L1 between the sigmoid box values (what the host decodes), weighted likewise;
* **features**: squared error of the P3/P4/P5 maps that feed the head, relative to the teacher's
  mean square (so each level counts alike whatever its scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class DistillGains:
    # at the start of QAT on YOLOv5n (PTQ error only) the raw terms are about obj 2e-3, cls 2e-3,
    # box 0.15, feature 0.1: these gains give the scores about as much weight as the boxes
    obj: float = 20.0
    cls: float = 20.0
    box: float = 0.5
    feature: float = 0.1


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of Bernoulli distributions given as logits (0 where they agree)."""
    p = teacher_logits.sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logits, p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, p, reduction="none"))


class QatLoss(nn.Module):
    def __init__(self, head_outputs, features, anchors_per_cell: int, gains: DistillGains):
        super().__init__()
        self.head_outputs, self.features, self.na, self.gains = list(head_outputs), list(features), anchors_per_cell, gains

    def _maps(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, na·no, ny, nx) → (B, na, ny, nx, no), as the head lays rows out."""
        b, c, ny, nx = raw.shape
        return raw.view(b, self.na, c // self.na, ny, nx).permute(0, 1, 3, 4, 2)

    def forward(self, student: dict, teacher: dict) -> tuple[torch.Tensor, dict]:
        obj = cls = box = feature = 0.0
        for name in self.head_outputs:
            s, t = self._maps(student[name]), self._maps(teacher[name].detach())
            weight = t[..., 4].sigmoid()
            total = weight.sum().clamp(min=1e-6)
            obj = obj + binary_kl(s[..., 4], t[..., 4]).mean()
            cls = cls + (binary_kl(s[..., 5:], t[..., 5:]).mean(-1) * weight).sum() / total
            box = box + ((s[..., :4].sigmoid() - t[..., :4].sigmoid()).abs().sum(-1) * weight).sum() / total
        for name in self.features:
            t = teacher[name].detach()
            feature = feature + (student[name] - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-6)
        g = self.gains
        parts = {k: float(torch.as_tensor(v).detach()) for k, v in (("obj", obj), ("cls", cls), ("box", box), ("feature", feature))}
        return g.obj * obj + g.cls * cls + g.box * box + g.feature * feature, parts
