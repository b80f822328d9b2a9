"""Knowledge distillation built for a YOLO detector (not one MSE over the outputs).

Two terms, both computed on the same augmented batch the student trains on:

* **Response distillation** on the head's raw maps, anchor by anchor (teacher and student share
  strides, anchors and classes): objectness and class probabilities against the teacher's,
  softened by a temperature ``T`` (binary KL of sigmoids, × T²); classes weighted by the
  teacher's objectness; boxes (1 − GIoU of the decoded boxes; CIoU is 0/0 for identical boxes) only where the teacher is
  confident, weighted by its objectness.
* **Feature imitation** (Wang et al., *fine-grained feature imitation*, CVPR 2019) on the
  P3/P4/P5 neck outputs that feed the head: a 1×1 adapter maps each student map to the
  teacher's width, and the squared error counts only at object locations — cells whose anchors
  overlap a label box by ≥ ψ·(best IoU of that box), or, label-free, cells where the teacher is
  confident. The adapters start as the least-squares map from the student's features to the
  teacher's on the first batch: a random start would make the student's features chase a random
  projection (its gradient is noise) while a pretrained or pruned student is still good.

Teacher and student may differ in width, depth and activation: only the head's layout must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import EdgeYoloError
from ..train.loss import bbox_iou


@dataclass
class DistillWeights:
    """Knobs of the distillation loss (gains are per image, like YOLOv5's own loss gains)."""

    obj: float = 1.0
    cls: float = 0.5
    box: float = 0.05
    feature: float = 0.02  # neck activations are O(1–10): keeps imitation near the response terms
    temperature: float = 2.0
    box_conf: float = 0.5  # boxes are distilled where the teacher's objectness exceeds this
    mask_conf: float = 0.5  # label-free imitation mask: teacher objectness above this
    fgfi_psi: float = 0.5  # with labels: anchors with IoU ≥ psi · best IoU of a label box


class NeckTap:
    """Keeps the inputs of a model's Detect head (the P3/P4/P5 neck outputs) of the last forward."""

    def __init__(self, model: nn.Module):
        self.features: list[torch.Tensor] = []
        self.handle = _core(model).detect.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.features = list(args[0])

    def remove(self) -> None:
        self.handle.remove()


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def neck_widths(model: nn.Module) -> list[int]:
    return [conv.in_channels for conv in _core(model).detect.m]


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must share the head's layout: classes, anchors, strides."""
    t, s = _core(teacher).detect, _core(student).detect
    if (t.nc, t.na, t.nl) != (s.nc, s.na, s.nl):
        raise EdgeYoloError(f"teacher and student heads differ: teacher {t.nc} classes × {t.na} anchors × {t.nl} "
                            f"levels, student {s.nc} × {s.na} × {s.nl}")
    if not torch.allclose(t.stride.cpu(), s.stride.cpu()) or not torch.allclose(t.anchors.cpu(), s.anchors.cpu()):
        raise EdgeYoloError("teacher and student heads use different strides or anchors")


class DistillLoss(nn.Module):
    """Response + feature-imitation loss; its 1×1 adapters are trained with the student."""

    def __init__(self, teacher: nn.Module, student: nn.Module, weights: DistillWeights | None = None):
        super().__init__()
        check_compatible(teacher, student)
        self.w = weights or DistillWeights()
        head = _core(student).detect
        self.register_buffer("anchors", head.anchors.detach().clone())  # grid units, (nl, na, 2)
        self.register_buffer("strides", head.stride.detach().clone().float())
        self.adapters = nn.ModuleList(
            nn.Conv2d(cs, ct, 1) for cs, ct in zip(neck_widths(student), neck_widths(teacher)))
        self.register_buffer("adapters_fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_adapters(self, student_feats, teacher_feats, ridge: float = 1e-3) -> None:
        """Each adapter := argmin ‖W·s + b − t‖² over every cell of the batch (ridge relative to the
        mean feature energy); in a distributed run rank 0's fit is shared so the ranks agree."""
        for adapter, s, t in zip(self.adapters, student_feats, teacher_feats):
            x = s.detach().double().permute(0, 2, 3, 1).reshape(-1, s.shape[1])
            y = t.detach().double().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
            a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
            gram = a.T @ a
            lam = ridge * float(torch.diagonal(gram).mean())
            w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), a.T @ y)
            adapter.weight.copy_(w[:-1].T.reshape(adapter.weight.shape).to(adapter.weight.dtype))
            adapter.bias.copy_(w[-1].to(adapter.bias.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in self.adapters.parameters():
                torch.distributed.broadcast(p.data, 0)
        self.adapters_fitted.fill_(True)

    def forward(self, student_maps, teacher_maps, student_feats, teacher_feats,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per image summed over parts, and the detached parts ``[obj, cls, box, feature]``."""
        parts = torch.zeros(4, device=student_maps[0].device)
        if not bool(self.adapters_fitted):
            self.fit_adapters(student_feats, teacher_feats)
        for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
            t = t.detach().float()
            s = s.float()
            parts[:3] = parts[:3] + self._response(s, t, i)
            mask = self._mask(t, i, targets, s.shape[0])
            parts[3] = parts[3] + self._imitation(self.adapters[i](student_feats[i].float()),
                                                  teacher_feats[i].detach().float(), mask)
        gains = torch.tensor([self.w.obj, self.w.cls, self.w.box, self.w.feature], device=parts.device)
        weighted = parts * gains
        return weighted.sum(), weighted.detach()

    # ------------------------------------------------------------------ response

    def _response(self, s: torch.Tensor, t: torch.Tensor, level: int) -> torch.Tensor:
        T = self.w.temperature
        t_obj = t[..., 4].sigmoid()
        obj = _binary_kl(s[..., 4] / T, t[..., 4] / T).mean() * T * T
        cls_kl = _binary_kl(s[..., 5:] / T, t[..., 5:] / T).mean(-1) * T * T
        cls = (cls_kl * t_obj).sum() / t_obj.sum().clamp(min=1e-6)
        confident = t_obj > self.w.box_conf
        if confident.any():
            weight = t_obj[confident]
            iou = bbox_iou(self._boxes(s, level)[confident], self._boxes(t, level)[confident].detach(), "giou")
            box = ((1 - iou.squeeze(-1)) * weight).sum() / weight.sum()
        else:
            box = s.sum() * 0
        return torch.stack([obj, cls, box])

    def _boxes(self, maps: torch.Tensor, level: int) -> torch.Tensor:
        """Raw maps → YOLOv5 boxes in grid units relative to each cell (enough to compare two models)."""
        p = maps[..., :4].sigmoid()
        xy = p[..., :2] * 2 - 0.5
        wh = (p[..., 2:4] * 2) ** 2 * self.anchors[level].view(1, -1, 1, 1, 2)
        return torch.cat((xy, wh.clamp(min=1e-6)), -1)  # a collapsed box has no defined aspect

    # ------------------------------------------------------------------ feature imitation

    def _mask(self, t: torch.Tensor, level: int, targets: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, ny, nx) boolean: where imitation counts."""
        if targets is None:
            return (t[..., 4].sigmoid() > self.w.mask_conf).any(1)
        return self._label_mask(targets, level, batch, t.shape[2], t.shape[3])

    def _label_mask(self, targets: torch.Tensor, level: int, batch: int, ny: int, nx: int) -> torch.Tensor:
        mask = torch.zeros(batch, ny, nx, dtype=torch.bool, device=targets.device)
        if not len(targets):
            return mask
        anchors = self.anchors[level]  # grid units
        gy, gx = torch.meshgrid(torch.arange(ny, device=mask.device), torch.arange(nx, device=mask.device),
                                indexing="ij")
        centres = torch.stack((gx, gy), -1).float() + 0.5  # (ny, nx, 2)
        anchor_boxes = torch.cat((centres[None].expand(len(anchors), ny, nx, 2),
                                  anchors.view(-1, 1, 1, 2).expand(-1, ny, nx, 2)), -1)  # (na, ny, nx, 4)
        scale = torch.tensor([nx, ny, nx, ny], device=mask.device, dtype=torch.float32)
        for row in targets:
            box = (row[2:6] * scale).view(1, 1, 1, 4)
            iou = bbox_iou(anchor_boxes, box.expand_as(anchor_boxes)).squeeze(-1)  # (na, ny, nx)
            best = iou.max()
            if best > 0:
                mask[int(row[0])] |= (iou >= self.w.fgfi_psi * best).any(0)
        return mask

    @staticmethod
    def _imitation(adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cells = mask.sum()
        if cells == 0:
            return adapted.sum() * 0
        error = (adapted - teacher).pow(2).mean(1)  # (B, ny, nx): per-channel mean keeps widths comparable
        return (error * mask).sum() / cells


def _binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of Bernoulli distributions given as logits (0 when they agree)."""
    p = teacher_logits.sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logits, p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, p, reduction="none"))


def load_teacher(spec, device: torch.device) -> nn.Module:
    """The teacher as a frozen float32 model: BatchNorm statistics fixed, head returning raw maps."""
    from ..model import load_model

    teacher = load_model(spec).model.float().to(device)
    teacher.eval()
    teacher.detect.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
