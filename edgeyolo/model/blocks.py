"""YOLOv5 building blocks, named and shaped exactly as in ultralytics/yolov5.

Module and attribute names match upstream so that a checkpoint's state_dict
keys (``model.2.cv1.conv.weight`` ...) load without renaming.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def autopad(k, p=None, d=1):
    """'Same' padding for kernel ``k`` with dilation ``d``."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation; ``fuse()`` folds the BN into the conv."""

    default_act: nn.Module = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = type(self).default_act
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        if hasattr(self, "bn"):
            return self.act(self.bn(self.conv(x)))
        return self.act(self.conv(x))

    def fuse(self) -> None:
        """Fold BatchNorm into the convolution's weight and bias (inference only)."""
        if not hasattr(self, "bn"):
            return
        self.conv = fuse_conv_bn(self.conv, self.bn)
        del self.bn


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new Conv2d equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
    ).to(conv.weight.device)
    with torch.no_grad():  # folded in float64 so the fused weights add no rounding of their own
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        fused.bias.copy_((bias - bn.running_mean.double()) * scale + bn.bias.double())
    return fused.requires_grad_(False)


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convolutions."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools equal SPP(5, 9, 13)."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3/early YOLOv5)."""

    def __init__(self, c1, c2, k=(5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class Focus(nn.Module):
    """Space-to-depth stem of YOLOv5 releases before v6.0."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


HEAD_DECODED = "decoded"
"""Head output ``(B, N, 5+nc)``: boxes in input pixels (cx, cy, w, h), then objectness and class scores."""
HEAD_SIGMOID = "sigmoid"
"""Head output ``(B, N, 5+nc)``: every value a sigmoid in 0..1; the host decodes boxes with grid and anchors.

One scale fits every channel, so fully-quantised engines keep their box accuracy."""
HEAD_MODES = (HEAD_DECODED, HEAD_SIGMOID)


class Detect(nn.Module):
    """YOLOv5 detection head.

    In training mode it returns the raw per-level maps. In eval mode it returns
    one ``(B, N, no)`` tensor whose rows follow (level, anchor, y, x) order, in
    the layout named by ``head_mode``.
    """

    stride: torch.Tensor | None = None

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace
        self.head_mode = HEAD_DECODED

    def forward(self, x):
        x = list(x)
        if self.training:
            for i in range(self.nl):
                bs, _, ny, nx = x[i].shape
                x[i] = self.m[i](x[i]).view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            return x
        outputs = []
        for i in range(self.nl):
            y = self.m[i](x[i])
            bs, _, ny, nx = y.shape
            y = y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            if self.head_mode == HEAD_DECODED:
                y = self._decode(y, i, nx, ny)
            outputs.append(y.reshape(bs, self.na * ny * nx, self.no))
        return torch.cat(outputs, 1)

    def _decode(self, y, i, nx, ny):
        grid, anchor_grid = self._make_grid(nx, ny, i, y.dtype, y.device)
        xy, wh, conf = y.split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * self.stride[i]
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4)

    def _make_grid(self, nx, ny, i, dtype, device):
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(
            torch.arange(ny, device=device, dtype=dtype), torch.arange(nx, device=device, dtype=dtype), indexing="ij"
        )
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def make_divisible(x, divisor):
    return math.ceil(x / divisor) * divisor
