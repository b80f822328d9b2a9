"""YOLOv5 model descriptions (``--cfg model.yaml``): validated, built, and initialised from other weights.

A model yaml is untrusted input. It is checked against a schema (known keys and layer names,
bounded sizes) and its parameter count is measured on the ``meta`` device before any real memory
is allocated. Nothing in it is evaluated: layer names map onto our own classes.
"""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EdgeYoloError
from ..schema import read_yaml_file
from .yolo import LAYERS, Model, parse_activation, parse_model

STANDARD_MULTIPLES = {  # (depth_multiple, width_multiple) of the official v6.x models
    "yolov5n": (0.33, 0.25),
    "yolov5s": (0.33, 0.50),
    "yolov5m": (0.67, 0.75),
    "yolov5l": (1.0, 1.0),
    "yolov5x": (1.33, 1.25),
}
MAX_LAYERS = 300
MAX_PARAMS = 400_000_000  # yolov5x6 has 141 M
_KEYS = {"nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head", "activation", "ch", "inplace"}
_REQUIRED = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _arg_ok(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if _number(value):
        return abs(value) <= 100_000
    if isinstance(value, str):
        return len(value) <= 32
    if isinstance(value, (list, tuple)) and depth < 2:
        return len(value) <= 64 and all(_arg_ok(v, depth + 1) for v in value)
    return False


def validate_architecture(cfg: Any, where: str = "model yaml") -> dict:
    """A deep copy of ``cfg`` if it is a well-formed, reasonably sized YOLOv5 description, else one-line error."""

    def fail(msg: str):
        raise EdgeYoloError(f"{where}: {msg}")

    if not isinstance(cfg, dict):
        fail("must be a mapping with backbone, head, anchors, nc, depth_multiple, width_multiple")
    unknown = sorted(str(k) for k in cfg if k not in _KEYS)
    if unknown:
        fail(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        fail(f"missing key {missing[0]!r}")
    if not _int(cfg["nc"], 1, 10_000):
        fail(f"nc must be an integer 1..10000, not {cfg['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if not _number(cfg[key]) or not 0 < cfg[key] <= 4:
            fail(f"{key} must be a number in (0, 4], not {cfg[key]!r}")
    if "ch" in cfg and not _int(cfg["ch"], 1, 16):
        fail(f"ch must be an integer 1..16, not {cfg['ch']!r}")
    if cfg.get("activation") is not None:
        parse_activation(cfg["activation"])
    anchors = cfg["anchors"]
    if isinstance(anchors, list):
        if not 1 <= len(anchors) <= 8 or not all(isinstance(a, list) for a in anchors):
            fail("anchors must be a list of 1..8 per-level lists")
        sizes = {len(a) for a in anchors}
        if len(sizes) != 1 or sizes.pop() not in range(2, 21, 2):
            fail("every anchor level must list the same even number (2..20) of values")
        if not all(_number(v) and 0 <= v <= 10_000 for a in anchors for v in a):
            fail("anchors must be numbers in 0..10000 pixels")
    elif not _int(anchors, 1, 10):
        fail(f"anchors must be per-level lists or an anchor count, not {anchors!r}")
    for key in ("backbone", "head"):
        if not isinstance(cfg[key], list):
            fail(f"{key} must be a list of [from, repeats, module, args] layers")
    layers = cfg["backbone"] + cfg["head"]
    if not 2 <= len(layers) <= MAX_LAYERS:
        fail(f"a model has 2..{MAX_LAYERS} layers, this one {len(layers)}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, list) or len(layer) != 4:
            fail(f"layer {i}: must be [from, repeats, module, args]")
        source, repeats, module, args = layer
        sources = source if isinstance(source, list) else [source]
        if not sources or len(sources) > 16 or not all(_int(s, -i if i else -1, max(i - 1, 0)) for s in sources):
            fail(f"layer {i}: 'from' must name earlier layers, not {source!r}")
        if i == 0 and sources != [-1]:
            fail("layer 0: 'from' must be -1 (the input image)")
        if not _int(repeats, 1, 100):
            fail(f"layer {i}: repeats must be an integer 1..100, not {repeats!r}")
        if not isinstance(module, str) or module not in LAYERS:
            fail(f"layer {i}: unsupported module {module!r} (known: {', '.join(LAYERS)})")
        if not isinstance(args, list) or not _arg_ok(args):
            fail(f"layer {i}: args must be a short list of numbers, names, booleans or lists")
        if module == "Detect" and i != len(layers) - 1:
            fail(f"layer {i}: Detect must be the last layer")
    if layers[-1][2] != "Detect":
        fail("the last layer must be Detect")
    return copy.deepcopy(cfg)


def count_parameters(cfg: dict) -> int:
    """Parameter count of the model ``cfg`` describes, measured without allocating (meta device)."""
    with torch.device("meta"):
        layers, _ = parse_model(copy.deepcopy(cfg), [cfg.get("ch", 3)])
    return sum(p.numel() for p in layers.parameters())


def build_model(cfg: dict, where: str = "model yaml") -> Model:
    """A ``Model`` from a validated description; bad values become one-line errors, huge ones are refused."""
    cfg = validate_architecture(cfg, where)
    try:
        n_params = count_parameters(cfg)
        if n_params > MAX_PARAMS:
            raise EdgeYoloError(f"{where}: describes {n_params / 1e6:.0f} M parameters (limit {MAX_PARAMS / 1e6:.0f} M)")
        return Model(cfg)
    except EdgeYoloError as exc:
        raise EdgeYoloError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    except Exception as exc:  # e.g. a kernel size that does not fit, channels that do not concatenate
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EdgeYoloError(f"{where}: cannot build a YOLOv5 model from it ({first})") from None


def standard_cfg(name: str) -> dict:
    """The description of ``yolov5n`` … ``yolov5x`` (shipped as data: one layout, five multiples)."""
    import yaml  # the [eval]/[train] extras bring pyyaml; plain .pt loading does not need it

    text = resources.files(__package__).joinpath("architectures", "yolov5.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(text)
    cfg["depth_multiple"], cfg["width_multiple"] = STANDARD_MULTIPLES[name]
    return cfg


def read_cfg(spec: str | Path | dict) -> dict:
    """A model description from a dict, a standard name (``yolov5s`` / ``yolov5s.yaml``) or a yaml file."""
    if isinstance(spec, dict):
        return validate_architecture(spec)
    path = Path(spec).expanduser()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if not path.exists() and name in STANDARD_MULTIPLES and str(spec) in (name, path.name):
        return standard_cfg(name)
    if not path.is_file():
        raise EdgeYoloError(f"{spec}: no such model yaml (or a standard name: {', '.join(STANDARD_MULTIPLES)})")
    data = read_yaml_file(path, "model yaml")
    return validate_architecture(data, str(path))


def init_detect_biases(model: Model) -> None:
    """Upstream's prior for a fresh head: ~8 objects per 640² image, classes near-uniform."""
    detect = model.detect
    with torch.no_grad():
        for conv, stride in zip(detect.m, detect.stride):
            bias = conv.bias.view(detect.na, -1)
            bias[:, 4] += math.log(8 / (640 / float(stride)) ** 2)
            bias[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99999))


def transfer_matching(model: nn.Module, source: dict[str, torch.Tensor], exclude: tuple[str, ...] = ("anchors",)) -> int:
    """Copy every tensor of ``source`` whose name and shape match ``model``'s; returns how many were copied."""
    target = model.state_dict()
    matched = {
        k: v for k, v in source.items()
        if k in target and v.shape == target[k].shape and not any(x in k for x in exclude)
    }
    model.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in matched.items()}})
    return len(matched)


def build_from_cfg(cfg, nc: int | None = None, names: list[str] | None = None, init_from=None,
                   act: str | None = None) -> tuple[Model, int]:
    """Build a YOLOv5 model from a description and initialise it from ``init_from`` where shapes match.

    ``cfg``: a dict, a yaml path or a standard name. ``nc``/``names`` set the class count (the head
    is then new); ``act`` replaces the activation (e.g. ``"ReLU"``); ``init_from``: a
    ``LoadedCheckpoint``, a ``Model`` or a state dict. Anchors keep the description's values.
    Returns the model (train-ready, float32) and the number of tensors transferred.
    """
    cfg = read_cfg(cfg)
    if names is not None:
        names = [str(n) for n in names]
        if nc is not None and nc != len(names):
            raise EdgeYoloError(f"{len(names)} class names given for nc={nc}")
        nc = len(names)
    if nc is not None:
        if not _int(nc, 1, 10_000):
            raise EdgeYoloError(f"nc must be an integer 1..10000, not {nc!r}")
        cfg["nc"] = nc
    if act is not None:
        cfg["activation"] = act
    model = build_model(cfg, "model yaml")
    init_detect_biases(model)
    source_model = getattr(init_from, "model", init_from)
    transferred = 0
    if init_from is not None:
        state = init_from if isinstance(init_from, dict) else source_model.state_dict()
        transferred = transfer_matching(model, state)
    source_names = list(getattr(source_model, "names", []) or [])
    if names is None and len(source_names) == model.detect.nc:
        names = source_names
    model.names = names or [f"class{i}" for i in range(model.detect.nc)]
    return model.float(), transferred
