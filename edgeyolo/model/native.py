"""edgeyolo's own model checkpoint: one ``.safetensors`` file, tensors plus a JSON description, no pickle.

Layout: a standard safetensors file. Its tensors are the model's ``state_dict`` (float32 unless
asked otherwise); its ``__metadata__["edgeyolo"]`` is a JSON object::

    {"format": "edgeyolo-model", "version": 1, "architecture": {YOLOv5 model yaml},
     "names": [...], "strides": [8, 16, 32], "anchors": [[px...], ...],
     "activation": "SiLU", "activation_overrides": {"model.3": "ReLU"},
     "batchnorm": {"eps": 0.001, "momentum": 0.03}, "batchnorm_overrides": {},
     "hyp": {...} | null, "epoch": int | null, "metrics": {"mAP50-95": ...}, "data": {"train": "sha256..."},
     "meta": {free-form}, "edgeyolo": "0.1.0"}

Channel widths are not taken from the yaml alone: the model is built from the architecture, then
every convolution and BatchNorm whose recorded tensor shape differs is resized to it (pruned
models), and a probe forward checks that the widths fit together. Loading validates the header
and the description completely before reading a tensor, and never executes anything.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import EdgeYoloError
from .blocks import Conv
from .cfg import build_model
from .checkpoint import LoadedCheckpoint
from .safetensors_file import (
    DTYPES,
    Header,
    read_header,
    read_metadata_json,
    read_tensors,
    write_atomically,
)
from .yolo import ACTIVATIONS, Model

FORMAT = "edgeyolo-model"
VERSION = 1
METADATA_KEY = "edgeyolo"
SUFFIX = ".safetensors"
_DESCRIPTION_KEYS = {
    "format", "version", "architecture", "names", "strides", "anchors", "activation", "activation_overrides",
    "batchnorm", "batchnorm_overrides", "hyp", "epoch", "metrics", "data", "meta", "edgeyolo",
}


@dataclass
class NativeCheckpoint(LoadedCheckpoint):
    """A loaded edgeyolo checkpoint: the model plus its JSON description (hyp, epoch, metrics, meta...)."""

    description: dict = field(default_factory=dict)


# ---------------------------------------------------------------- activations and BatchNorm settings

def activation_spec(module: nn.Module) -> str:
    """``SiLU``, ``ReLU``, ``LeakyReLU(0.1)``, ``Identity`` ... (what ``parse_activation`` reads back)."""
    name = type(module).__name__
    if name == "LeakyReLU":
        return f"LeakyReLU({module.negative_slope!r})"
    if name == "Identity" or name in ACTIVATIONS:
        return name
    raise EdgeYoloError(f"cannot record activation {name} (known: {', '.join(ACTIVATIONS)}, Identity)")


def make_activation(spec: str) -> nn.Module:
    from .yolo import parse_activation

    return nn.Identity() if spec == "Identity" else parse_activation(spec)


def _common_and_overrides(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if not values:
        return None, {}
    common = Counter(json.dumps(v, sort_keys=True) for v in values.values()).most_common(1)[0][0]
    common = json.loads(common)
    return common, {k: v for k, v in values.items() if v != common}


def describe_model(model: Model) -> dict:
    """The structural part of the description (everything needed to rebuild ``model``)."""
    acts = {name: activation_spec(m.act) for name, m in model.named_modules() if isinstance(m, Conv)}
    bns = {name: {"eps": float(m.eps), "momentum": m.momentum}
           for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    activation, act_overrides = _common_and_overrides(acts)
    batchnorm, bn_overrides = _common_and_overrides(bns)
    head = model.describe()
    architecture = dict(model.yaml)
    if activation is not None and activation != "Identity":
        architecture["activation"] = activation
    return {
        "format": FORMAT, "version": VERSION, "architecture": architecture, "names": list(model.names),
        "strides": head["strides"], "anchors": head["anchors"],
        "activation": activation or "SiLU", "activation_overrides": act_overrides,
        "batchnorm": batchnorm or {"eps": 1e-3, "momentum": 0.03}, "batchnorm_overrides": bn_overrides,
    }


# ---------------------------------------------------------------- writing

def save_model(model: nn.Module, path: str | Path, *, hyp: dict | None = None, epoch: int | None = None,
               metrics: dict | None = None, data: dict | None = None, meta: dict | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (our ``Model``, possibly DDP-wrapped or pruned) as an edgeyolo checkpoint, atomically."""
    model = getattr(model, "module", model)
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    description = {
        **describe_model(model),
        "hyp": dict(hyp) if hyp is not None else None,
        "epoch": epoch,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "data": {k: str(v) for k, v in (data or {}).items()},
        "meta": meta or {},
        "edgeyolo": __version__,
    }
    _validate_description(description, path)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return write_atomically(path, tensors, {METADATA_KEY: json.dumps(description)})


# ---------------------------------------------------------------- reading

def is_native_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` should be read as our safetensors checkpoint (by name or by its first bytes)."""
    from .safetensors_file import looks_like_safetensors

    path = Path(path)
    return path.is_file() and looks_like_safetensors(path)


def load_native(path: str | Path) -> NativeCheckpoint:
    """Rebuild the float32 model (eval mode) a checkpoint describes, widths and activations included."""
    path = Path(path)
    if not path.is_file():
        raise EdgeYoloError(f"{path}: no such checkpoint file")
    header = read_header(path)
    description = read_metadata_json(path, header, METADATA_KEY, "model description")
    _validate_description(description, path)
    cfg = dict(description["architecture"])
    cfg["activation"] = None if description["activation"] == "Identity" else description["activation"]
    model = build_model(cfg, str(path))
    _check_tensor_names(model, header, path)
    _resize_to_header(model, header, path)
    _apply_settings(model, description)
    state = read_tensors(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    _probe(model, description, path)
    model.names = list(description["names"])
    dtype = next((str(DTYPES[t.dtype][0]).replace("torch.", "") for t in header.tensors.values()
                  if DTYPES[t.dtype][0].is_floating_point), "float32")
    return NativeCheckpoint(model=model.float().eval(), names=model.names, source=str(path),
                            original_dtype=dtype, description=description)


def _check_tensor_names(model: Model, header: Header, path: Path) -> None:
    expected, found = set(model.state_dict()), set(header.tensors)
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise EdgeYoloError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if extra:
        raise EdgeYoloError(f"{path}: unexpected tensor {extra[0]!r} for this architecture ({len(extra)} extra)")


def _resize_to_header(model: Model, header: Header, path: Path) -> None:
    """Give every conv / BatchNorm the width its recorded tensors have (a pruned model's real widths)."""
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, nn.Conv2d):
            shape = header.tensors[f"{name}.weight"].shape
            if tuple(module.weight.shape) != shape:
                _replace(model, name, _resized_conv(module, shape, name, path))
        elif isinstance(module, nn.BatchNorm2d):
            shape = header.tensors[f"{name}.weight"].shape
            if tuple(module.weight.shape) != shape:
                if len(shape) != 1 or shape[0] < 1:
                    raise EdgeYoloError(f"{path}: tensor '{name}.weight' has shape {list(shape)}, a BatchNorm needs 1-D")
                new = nn.BatchNorm2d(shape[0], eps=module.eps, momentum=module.momentum)
                _replace(model, name, new)
    wanted = model.state_dict()
    for key, info in header.tensors.items():
        if tuple(wanted[key].shape) != info.shape:
            raise EdgeYoloError(f"{path}: tensor {key!r} has shape {list(info.shape)}, the model needs "
                                f"{list(wanted[key].shape)}")
        if DTYPES[info.dtype][0].is_floating_point != wanted[key].is_floating_point():
            raise EdgeYoloError(f"{path}: tensor {key!r} is {info.dtype}, the model needs {wanted[key].dtype}")


def _resized_conv(conv: nn.Conv2d, shape: tuple[int, ...], name: str, path: Path) -> nn.Conv2d:
    if len(shape) != 4 or shape[2:] != tuple(conv.kernel_size) or min(shape) < 1:
        raise EdgeYoloError(f"{path}: tensor '{name}.weight' has shape {list(shape)}, not a "
                            f"{conv.kernel_size[0]}x{conv.kernel_size[1]} convolution's")
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    groups = shape[0] if depthwise else conv.groups
    if shape[0] % groups:
        raise EdgeYoloError(f"{path}: tensor '{name}.weight' output width {shape[0]} does not fit {groups} groups")
    return nn.Conv2d(shape[1] * groups, shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _apply_settings(model: Model, description: dict) -> None:
    act, act_over = description["activation"], description["activation_overrides"]
    bn, bn_over = description["batchnorm"], description["batchnorm_overrides"]
    for name, module in model.named_modules():
        if isinstance(module, Conv):
            spec = act_over.get(name, act)
            if activation_spec(module.act) != spec:
                module.act = make_activation(spec)
        elif isinstance(module, nn.BatchNorm2d):
            settings = bn_over.get(name, bn)
            module.eps, module.momentum = settings["eps"], settings["momentum"]


def _probe(model: Model, description: dict, path: Path) -> None:
    """A tiny forward: widths that do not fit together fail here, not later in a user's command."""
    size = int(model.imgsz_multiple) * 2
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.yaml.get("ch", 3), size, size))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0][:200]
        raise EdgeYoloError(f"{path}: the recorded channel widths do not fit together ({first})") from None
    head = model.describe()
    if head["strides"] != description["strides"]:
        raise EdgeYoloError(f"{path}: recorded strides {description['strides']} differ from the model's {head['strides']}")
    for got, want in zip(head["anchors"], description["anchors"]):
        if len(got) != len(want) or any(not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3) for a, b in zip(got, want)):
            raise EdgeYoloError(f"{path}: recorded anchors differ from the anchor tensor")


# ---------------------------------------------------------------- description schema

def _validate_description(d: dict, path: Path) -> None:
    def fail(msg: str):
        raise EdgeYoloError(f"{path}: model description: {msg}")

    unknown = sorted(set(d) - _DESCRIPTION_KEYS)
    if unknown:
        fail(f"unknown key {unknown[0]!r}")
    if d.get("format") != FORMAT:
        fail(f"format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("version") != VERSION:
        fail(f"version {d.get('version')!r} is not supported (this edgeyolo reads version {VERSION})")
    missing = sorted(k for k in _DESCRIPTION_KEYS if k not in d)
    if missing:
        fail(f"missing key {missing[0]!r}")
    if not isinstance(d["architecture"], dict):
        fail("architecture must be a YOLOv5 model yaml mapping")
    from .cfg import validate_architecture

    validate_architecture(d["architecture"], f"{path}: architecture")
    nc = d["architecture"]["nc"]
    names = d["names"]
    if not isinstance(names, list) or len(names) != nc or not all(isinstance(n, str) and len(n) <= 256 for n in names):
        fail(f"names must be a list of {nc} strings")
    if not isinstance(d["strides"], list) or not all(isinstance(s, int) and 1 <= s <= 1024 for s in d["strides"]):
        fail("strides must be a list of integers")
    if not isinstance(d["anchors"], list) or not all(
            isinstance(a, list) and all(_finite(v) for v in a) for a in d["anchors"]):
        fail("anchors must be per-level lists of numbers")
    for key in ("activation",):
        if not isinstance(d[key], str):
            fail(f"{key} must be a string")
        make_activation(d[key])
    if not isinstance(d["activation_overrides"], dict) or not all(
            isinstance(v, str) for v in d["activation_overrides"].values()):
        fail("activation_overrides must map module names to activation names")
    for spec in set(d["activation_overrides"].values()):
        make_activation(spec)
    for settings in [d["batchnorm"], *(d["batchnorm_overrides"].values() if isinstance(d["batchnorm_overrides"], dict) else [None])]:
        if (not isinstance(settings, dict) or set(settings) != {"eps", "momentum"} or not _finite(settings["eps"])
                or not 0 < settings["eps"] < 1 or not (settings["momentum"] is None or _finite(settings["momentum"]))):
            fail("batchnorm settings must be {eps, momentum} numbers")
    if d["hyp"] is not None and not (isinstance(d["hyp"], dict) and all(
            isinstance(v, (str, int, float, bool)) for v in d["hyp"].values())):
        fail("hyp must be a mapping of names to numbers or strings")
    if d["epoch"] is not None and not (isinstance(d["epoch"], int) and not isinstance(d["epoch"], bool) and d["epoch"] >= -1):
        fail("epoch must be an integer")
    if not isinstance(d["metrics"], dict) or not all(_finite(v) for v in d["metrics"].values()):
        fail("metrics must map names to numbers")
    if not isinstance(d["data"], dict) or not all(isinstance(v, str) for v in d["data"].values()):
        fail("data must map names to strings (hashes)")
    if not isinstance(d["meta"], dict):
        fail("meta must be a JSON object")
    if not isinstance(d["edgeyolo"], str):
        fail("edgeyolo must be a version string")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
