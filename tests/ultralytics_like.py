"""Write checkpoints that pickle exactly like ultralytics' (``models.yolo.Model`` ...), from our own model.

Lets the tests cover every size, P6 models, old Focus/SPP layouts and custom class counts
without the real files: the pickle names the same globals an ultralytics ``.pt`` names.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from edgeyolo.model import Model
from edgeyolo.model import blocks

_FAKE_MODULES = {
    "models.yolo": ["Model", "Detect"],
    "models.common": ["Conv", "C3", "Bottleneck", "SPPF", "SPP", "Focus", "Concat"],
}


def _fake_classes() -> dict[type, type]:
    """Register modules named models.yolo / models.common whose classes subclass ours."""
    mapping = {}
    sys.modules.setdefault("models", types.ModuleType("models"))
    for module_name, class_names in _FAKE_MODULES.items():
        module = sys.modules.get(module_name) or types.ModuleType(module_name)
        sys.modules[module_name] = module
        for name in class_names:
            ours = Model if name == "Model" else getattr(blocks, name)
            fake = getattr(module, name, None) or type(name, (ours,), {"__module__": module_name})
            setattr(module, name, fake)
            mapping[ours] = fake
    return mapping


def save_ultralytics_like(model: Model, path: Path, half: bool = True, key: str = "model") -> Path:
    mapping = _fake_classes()
    model = model.half() if half else model.float()
    for m in model.modules():
        if type(m) in mapping:
            m.__class__ = mapping[type(m)]
    for m in model.modules():
        m.__dict__.pop("head_mode", None)  # ultralytics' Detect has no such attribute
    other = "ema" if key == "model" else "model"
    torch.save({"epoch": -1, key: model, other: None, "optimizer": None, "date": "2026-11-28"}, path)
    return path


def yaml_v6(nc: int = 80, depth: float = 0.33, width: float = 0.25) -> dict:
    """The YOLOv5 v6+ architecture (n/s/m/l/x differ only in the two multiples)."""
    return {
        "nc": nc, "depth_multiple": depth, "width_multiple": width,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [
            [-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
            [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
            [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]],
        ],
        "head": [
            [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 6], 1, "Concat", [1]],
            [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
            [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
            [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
        ],
    }


def yaml_p6(nc: int = 80, depth: float = 0.33, width: float = 0.25) -> dict:
    """The P6 architecture (yolov5n6 ... x6): four output levels, strides 8-64."""
    return {
        "nc": nc, "depth_multiple": depth, "width_multiple": width,
        "anchors": [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
                    [436, 615, 739, 380, 925, 792]],
        "backbone": [
            [-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
            [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]], [-1, 9, "C3", [512]],
            [-1, 1, "Conv", [768, 3, 2]], [-1, 3, "C3", [768]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]],
            [-1, 1, "SPPF", [1024, 5]],
        ],
        "head": [
            [-1, 1, "Conv", [768, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 8], 1, "Concat", [1]],
            [-1, 3, "C3", [768, False]], [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]],
            [-1, 1, "Conv", [256, 3, 2]], [[-1, 20], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
            [-1, 1, "Conv", [512, 3, 2]], [[-1, 16], 1, "Concat", [1]], [-1, 3, "C3", [768, False]],
            [-1, 1, "Conv", [768, 3, 2]], [[-1, 12], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
            [[23, 26, 29, 32], 1, "Detect", ["nc", "anchors"]],
        ],
    }


def yaml_v5_focus(nc: int = 80) -> dict:
    """A pre-v6 layout: Focus stem and SPP, LeakyReLU activation."""
    cfg = yaml_v6(nc)
    cfg["backbone"] = [[-1, 1, "Focus", [64, 3]]] + cfg["backbone"][1:-1] + [[-1, 1, "SPP", [1024, [5, 9, 13]]]]
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    return cfg


def random_model(cfg: dict, seed: int = 0) -> Model:
    """A model with random weights and non-trivial BN statistics, so load errors show."""
    torch.manual_seed(seed)
    model = Model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model.names = [f"thing{i}" for i in range(cfg["nc"])]
    return model.eval()
