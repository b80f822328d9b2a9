"""YOLOv5's detection loss (``utils/loss.py`` ComputeLoss), reproduced exactly.

Targets are matched to anchors whose width/height ratio is within ``anchor_t``; each target is also
assigned to the two neighbouring cells nearest its centre (offset 0.5), so that a prediction's
``2*sigmoid-0.5`` centre can reach it. Box loss is ``1 - IoU`` (CIoU by default), objectness is BCE
against the detached, clamped IoU of the matched prediction, classes are BCE with optional label
smoothing; focal loss can wrap both BCEs. Levels are weighted [4.0, 1.0, 0.4] (P3..P5).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .hyp import DEFAULT_HYP, validate_value

_EPS = 1e-7
BALANCE = {3: [4.0, 1.0, 0.4], 4: [4.0, 1.0, 0.25, 0.06], 5: [4.0, 1.0, 0.25, 0.06, 0.02]}
# The centre cell and its four neighbours (x+, y+, x-, y-), scaled by the 0.5 matching offset.
_NEIGHBOURS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)
_OFFSET = 0.5


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, kind: str = "iou") -> torch.Tensor:
    """IoU of paired ``(cx, cy, w, h)`` boxes, or its GIoU / DIoU / CIoU variant; shape ``(..., 1)``."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + _EPS
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if kind == "giou":
        c_area = cw * ch + _EPS
        return iou - (c_area - union) / c_area
    diag2 = cw**2 + ch**2 + _EPS
    centre2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if kind == "diou":
        return iou - centre2 / diag2
    if kind != "ciou":
        raise ValueError(f"unknown IoU kind {kind!r}")
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + _EPS))
    return iou - (centre2 / diag2 + v * alpha)


class FocalLoss(nn.Module):
    """Focal loss around a BCE-with-logits criterion (Lin et al.; alpha 0.25 as upstream)."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float, alpha: float = 0.25):
        super().__init__()
        self.bce, self.gamma, self.alpha = bce, gamma, alpha
        self.bce.reduction = "none"

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.bce(pred, true)
        prob = pred.sigmoid()
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        return (loss * alpha_factor * (1.0 - p_t) ** self.gamma).mean()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def scaled_gains(hyp: Mapping[str, Any], nl: int, nc: int, imgsz: int) -> tuple[float, float, float]:
    """Upstream train.py's scaling of the box/obj/cls gains to the level count, classes and image size."""
    return (
        hyp["box"] * 3 / nl,
        hyp["obj"] * (imgsz / 640) ** 2 * 3 / nl,
        hyp["cls"] * nc / 80 * 3 / nl,
    )


class YoloLoss:
    """``loss, parts = YoloLoss(model, hyp)(preds, targets)``.

    ``preds``: the training-mode ``Detect`` output, one ``(B, na, ny, nx, 5+nc)`` map per level.
    ``targets``: ``(N, 6)`` rows ``image_index, class, cx, cy, w, h`` normalised to 0..1.
    ``loss`` is (lbox + lobj + lcls) × batch size, what upstream back-propagates; ``parts`` the
    detached ``[lbox, lobj, lcls]``.
    """

    def __init__(self, model: nn.Module, hyp: Mapping[str, Any] | None = None, imgsz: int = 640):
        hyp = {**DEFAULT_HYP, **(hyp or {})}
        detect = unwrap(model).detect
        device = detect.anchors.device
        self.nc, self.na, self.nl = detect.nc, detect.na, detect.nl
        self.anchors = detect.anchors  # grid units, (nl, na, 2)
        self.balance = BALANCE.get(self.nl, BALANCE[5])
        self.anchor_t = float(hyp["anchor_t"])
        self.iou_type = validate_value("iou_type", hyp["iou_type"])
        self.box_gain, self.obj_gain, self.cls_gain = scaled_gains(hyp, self.nl, self.nc, imgsz)
        eps = float(hyp["label_smoothing"])
        self.cp, self.cn = 1.0 - 0.5 * eps, 0.5 * eps
        self.bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["cls_pw"]], device=device))
        self.bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["obj_pw"]], device=device))
        if hyp["fl_gamma"] > 0:
            self.bce_cls = FocalLoss(self.bce_cls, hyp["fl_gamma"])
            self.bce_obj = FocalLoss(self.bce_obj, hyp["fl_gamma"])
        self.gr = 1.0  # objectness target = gr * IoU + (1 - gr)

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = preds[0].device
        targets = targets.to(device=device, dtype=torch.float32)
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        for i, (pi, (tcls, tbox, (b, a, gj, gi), anchors)) in enumerate(zip(preds, self.build_targets(preds, targets))):
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox, self.iou_type).squeeze(-1)
                lbox += (1.0 - iou).mean()
                iou = iou.detach().clamp(0).type(tobj.dtype)
                tobj[b, a, gj, gi] = (1.0 - self.gr) + self.gr * iou
                if self.nc > 1:  # a single class is learned by objectness alone
                    t = torch.full_like(pcls, self.cn)
                    t[range(n), tcls] = self.cp
                    lcls += self.bce_cls(pcls, t)
            lobj += self.bce_obj(pi[..., 4], tobj) * self.balance[i]
        lbox *= self.box_gain
        lobj *= self.obj_gain
        lcls *= self.cls_gain
        batch = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor):
        """Per level: (classes, boxes relative to their cell, (image, anchor, gy, gx) indices, anchors)."""
        device = targets.device
        na, nt = self.na, targets.shape[0]
        gain = torch.ones(7, device=device)
        anchor_index = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), anchor_index[..., None]), 2)  # (na, nt, 7)
        offsets_table = _NEIGHBOURS.to(device) * _OFFSET
        out = []
        for i in range(self.nl):
            anchors, shape = self.anchors[i].to(device), preds[i].shape
            gain[2:6] = torch.tensor(shape, device=device)[[3, 2, 3, 2]].float()
            t = targets * gain  # to grid units
            if nt:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2)[0] < self.anchor_t]
                gxy = t[:, 2:4]
                gxy_inv = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < _OFFSET) & (gxy > 1)).T
                left, m = ((gxy_inv % 1 < _OFFSET) & (gxy_inv > 1)).T
                mask = torch.stack((torch.ones_like(j), j, k, left, m))
                t = t.repeat((5, 1, 1))[mask]
                offsets = (torch.zeros_like(gxy)[None] + offsets_table[:, None])[mask]
            else:
                t, offsets = targets[0], 0
            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            gij[:, 0].clamp_(0, shape[3] - 1)
            gij[:, 1].clamp_(0, shape[2] - 1)
            gi, gj = gij.T
            out.append((c, torch.cat((gxy - gij, gwh), 1), (b, a, gj, gi), anchors[a]))
        return out
