"""Training hyper-parameters: YOLOv5's hyp.scratch-low defaults, and a strict reader for user hyp files.

A hyp file is untrusted input: every key must be known, every value of the right type, finite and
in range, or the user gets one line naming the key.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import EdgeYoloError
from ..schema import read_yaml_file

IOU_TYPES = ("giou", "diou", "ciou")

# key -> (low, high) inclusive range for numeric keys; every default is a float except iou_type.
_PROBABILITIES = (
    "flipud", "fliplr", "mosaic", "mixup", "copy_paste", "blur", "median_blur", "gray", "clahe",
    "brightness_contrast", "gamma", "jpeg", "color_jitter", "rotate90",
)
RANGES: dict[str, tuple[float, float]] = {
    "lr0": (0.0, 10.0),
    "lrf": (0.0, 1.0),
    "momentum": (0.0, 1.0),
    "weight_decay": (0.0, 1.0),
    "warmup_epochs": (0.0, 1000.0),
    "warmup_momentum": (0.0, 1.0),
    "warmup_bias_lr": (0.0, 10.0),
    "box": (0.0, 1000.0),
    "cls": (0.0, 1000.0),
    "cls_pw": (0.0, 1000.0),
    "obj": (0.0, 1000.0),
    "obj_pw": (0.0, 1000.0),
    "iou_t": (0.0, 1.0),
    "anchor_t": (1.0, 100.0),
    "fl_gamma": (0.0, 10.0),
    "label_smoothing": (0.0, 1.0),
    "hsv_h": (0.0, 1.0),
    "hsv_s": (0.0, 1.0),
    "hsv_v": (0.0, 1.0),
    "degrees": (0.0, 180.0),
    "translate": (0.0, 0.9),
    "scale": (0.0, 0.9),
    "shear": (0.0, 90.0),
    "perspective": (0.0, 0.001),
    **{key: (0.0, 1.0) for key in _PROBABILITIES},
}

def _read_defaults() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("hyp_default.yaml").read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    return {k: (v if isinstance(v, str) else float(v)) for k, v in values.items()}


DEFAULT_HYP: Mapping[str, Any] = _read_defaults()


def validate_value(key: str, value: Any) -> Any:
    """One hyp value checked and normalised (numbers → float, iou_type → lower case)."""
    if key not in DEFAULT_HYP:
        raise EdgeYoloError(f"hyp: unknown key {key!r} (known: {', '.join(sorted(DEFAULT_HYP))})")
    if key == "iou_type":
        if not isinstance(value, str) or value.lower() not in IOU_TYPES:
            raise EdgeYoloError(f"hyp: iou_type must be one of {', '.join(IOU_TYPES)}, not {value!r}")
        return value.lower()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeYoloError(f"hyp: {key} must be a number, not {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise EdgeYoloError(f"hyp: {key} must be finite, not {value}")
    low, high = RANGES[key]
    if not low <= value <= high:
        raise EdgeYoloError(f"hyp: {key} = {value:g} is out of range [{low:g}, {high:g}]")
    return value


def read_hyp_file(path: str | Path) -> dict[str, Any]:
    """The key/value mapping of a hyp YAML file, as raw (unvalidated) values."""
    path = Path(path)
    data = read_yaml_file(path, "hyp file", invalid="not a valid YAML hyp file")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise EdgeYoloError(f"{path}: a hyp file must be a mapping of names to values")
    return data


def load_hyp(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the hyp file's values, then ``overrides`` (e.g. ``--lr0``), all validated."""
    hyp = dict(DEFAULT_HYP)
    layers = [read_hyp_file(path) if path is not None else {}, dict(overrides or {})]
    for layer in layers:
        for key, value in layer.items():
            if value is None and layer is layers[1]:
                continue  # an unset CLI option
            hyp[key] = validate_value(key, value)
    return hyp
