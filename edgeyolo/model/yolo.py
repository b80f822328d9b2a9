"""The YOLOv5 ``Model``, built from the architecture dict that every ultralytics checkpoint carries."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import EdgeYoloError
from .blocks import C3, HEAD_MODES, SPP, SPPF, Bottleneck, Concat, Conv, Detect, Focus, make_divisible

# Layer names a YOLOv5 yaml may use, mapped onto our own classes (never eval'd).
LAYERS: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "SPP": SPP,
    "Focus": Focus,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
    "Upsample": nn.Upsample,
    "nn.BatchNorm2d": nn.BatchNorm2d,
}
_CHANNEL_LAYERS = (Conv, Bottleneck, C3, SPPF, SPP, Focus)
_REPEATED_INSIDE = (C3,)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "Mish": nn.Mish,
}


def parse_activation(spec: str | None) -> nn.Module | None:
    """Turn a yaml ``activation`` string such as ``nn.LeakyReLU(0.1)`` into a module, without eval."""
    if spec is None:
        return None
    match = re.fullmatch(r"\s*(?:nn\.|torch\.nn\.)?(\w+)\s*(?:\(\s*([0-9.eE+-]*)\s*\))?\s*", str(spec))
    if not match or match.group(1) not in ACTIVATIONS:
        raise EdgeYoloError(f"unsupported activation {spec!r} (known: {', '.join(ACTIVATIONS)})")
    cls = ACTIVATIONS[match.group(1)]
    return cls(float(match.group(2))) if match.group(2) else cls()


class Model(nn.Module):
    """YOLOv5 detection model: ``self.model`` is the layer list, the last layer a ``Detect``."""

    def __init__(self, cfg: dict, ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = copy.deepcopy(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), [self.yaml.get("ch", ch)])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        detect = self.detect
        detect.stride = self._probe_strides(ch)
        # Anchors in the yaml are in pixels; the head keeps them in grid units (as upstream).
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self.stride = detect.stride
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):  # YOLOv5's own BN settings (initialize_weights)
                module.eps, module.momentum = 1e-3, 0.03

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def _probe_strides(self, ch: int) -> torch.Tensor:
        size = 256
        self.eval()
        self.detect.train()  # the raw per-level maps tell each level's stride
        with torch.no_grad():
            outs = self.forward(torch.zeros(1, ch, size, size))
        self.detect.eval()
        return torch.tensor([size / x.shape[-2] for x in outs])

    @property
    def head_mode(self) -> str:
        return self.detect.head_mode

    @head_mode.setter
    def head_mode(self, mode: str) -> None:
        if mode not in HEAD_MODES:
            raise ValueError(f"head mode must be one of {HEAD_MODES}, not {mode!r}")
        self.detect.head_mode = mode

    def forward(self, x):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def fuse(self) -> "Model":
        """Fold every BatchNorm into its convolution (for export and fast inference)."""
        for module in self.modules():
            if isinstance(module, Conv):
                module.fuse()
        return self

    @property
    def imgsz_multiple(self) -> int:
        return int(self.stride.max())

    def describe(self) -> dict:
        """Facts about the head that a runtime needs to decode its output."""
        detect = self.detect
        return {
            "nc": detect.nc,
            "strides": [int(s) for s in detect.stride.tolist()],
            "anchors": (detect.anchors * detect.stride.view(-1, 1, 1)).reshape(detect.nl, -1).tolist(),
            "names": list(self.names),
        }


def parse_model(d: dict, ch: list[int]):
    """Build the layer list from a YOLOv5 architecture dict (the checkpoint's ``yaml``)."""
    try:
        anchors, nc = d["anchors"], d["nc"]
        gd, gw = d["depth_multiple"], d["width_multiple"]
        layer_specs = d["backbone"] + d["head"]
    except (KeyError, TypeError) as exc:
        raise EdgeYoloError(f"not a YOLOv5 architecture: missing {exc}") from None
    act = parse_activation(d.get("activation"))
    if act is not None:
        Conv.default_act = act
    else:
        Conv.default_act = nn.SiLU()
    if isinstance(anchors, int):  # auto-anchor: real values come with the weights
        anchors = [[0.0] * (anchors * 2)] * 3
    na = len(anchors[0]) // 2
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}

    layers, save, c2 = [], [], ch[-1]
    for i, spec in enumerate(layer_specs):
        f, n, m_name, args = spec
        m = LAYERS.get(m_name) if isinstance(m_name, str) else None
        if m is None:
            raise EdgeYoloError(f"layer {i}: unsupported YOLOv5 layer type {m_name!r}")
        args = [names.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if m in _CHANNEL_LAYERS:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in _REPEATED_INSIDE:
                args.insert(2, n)
                n = 1
        elif m is nn.BatchNorm2d:
            args = [ch[f]]
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]
        module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        module.i, module.f = i, f
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)
