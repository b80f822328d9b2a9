"""Read YOLOv5 checkpoints without running code from them.

An ultralytics ``.pt`` is a pickle of the whole ``models.yolo.Model`` object.
Unpickling it the ordinary way imports and calls whatever the file names. We
instead let torch's restricted (``weights_only``) unpickler read it, allowing
only torch's own tensor rebuilders plus *inert stand-ins* for the YOLOv5 and
``torch.nn`` class names: a stand-in merely records the pickled attributes.
Any other global (``os.system``, ``builtins.eval``...) is refused before
anything runs. The recorded tensors are then loaded into our own ``Model``.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EdgeYoloError
from .yolo import Model

OWN_FORMAT = "edgeyolo-checkpoint/1"

_YOLO_CLASSES = [
    "models.yolo.Model", "models.yolo.DetectionModel", "models.yolo.Detect",
    "models.common.Conv", "models.common.C3", "models.common.Bottleneck", "models.common.SPPF",
    "models.common.SPP", "models.common.Focus", "models.common.Concat",
]
_TORCH_NN_CLASSES = [
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.SiLU", "torch.nn.modules.activation.LeakyReLU",
    "torch.nn.modules.activation.ReLU", "torch.nn.modules.activation.ReLU6",
    "torch.nn.modules.activation.Hardswish", "torch.nn.modules.activation.Mish",
    "torch.nn.modules.linear.Identity", "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
]
# Harmless metadata training checkpoints may carry (numpy scalars for best_fitness...).
_INERT_METADATA = [
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.dtypes.Float64DType", "numpy.dtypes.Float32DType", "argparse.Namespace",
]


class PickledObject:
    """Stand-in for an allowed class named in a pickle: keeps its attributes, runs nothing."""

    pickled_name = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self):
        return f"<pickled {self.pickled_name}>"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (PickledObject,), {"pickled_name": name, "__module__": __name__})


_STAND_INS = [(_stand_in(n), n) for n in _YOLO_CLASSES + _TORCH_NN_CLASSES + _INERT_METADATA]


@dataclass
class LoadedCheckpoint:
    model: Model
    names: list[str]
    source: str
    original_dtype: str


# Bounds no YOLOv5 checkpoint comes near (YOLOv5x: 86M parameters, its largest weight 14.7M), checked
# before any tensor is materialised, so a hostile file is refused before it costs memory.
MAX_TENSOR_ELEMENTS = 64 << 20
MAX_TOTAL_ELEMENTS = 512 << 20
MAX_PICKLE_BYTES = 256 << 20
_TENSOR_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.uint8, torch.int8, torch.bool}


def check_archive(path: Path) -> None:
    """A torch zip's declared sizes, read from its directory before unpickling: no zip bomb, no giant pickle."""
    if not zipfile.is_zipfile(path):
        return  # legacy (non-zip) torch files: torch refuses them under weights_only or reads them bounded
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise EdgeYoloError(f"{path}: corrupt checkpoint archive ({_first_line(exc)})") from None
    size = path.stat().st_size
    declared = sum(m.file_size for m in members)
    if declared > 2 * size + (1 << 20):
        raise EdgeYoloError(f"{path}: refused, the archive claims to unpack to {declared >> 20} MB from "
                            f"{size >> 20} MB (a zip bomb?)")
    pickles = [m for m in members if m.filename.endswith(".pkl")]
    if any(m.file_size > MAX_PICKLE_BYTES for m in pickles):
        raise EdgeYoloError(f"{path}: refused, its pickle is larger than {MAX_PICKLE_BYTES >> 20} MB")


def check_tensor(tensor, name: str, path: Path) -> int:
    """A tensor record must be a plain dense tensor that its own storage covers (no stride-0 expansion)."""
    if not isinstance(tensor, torch.Tensor):
        raise EdgeYoloError(f"{path}: refused, weight {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.dtype not in _TENSOR_DTYPES or tensor.is_quantized:
        raise EdgeYoloError(f"{path}: refused, weight {name!r} is not a plain tensor ({tensor.dtype}, {tensor.layout})")
    numel = tensor.numel()
    if numel > MAX_TENSOR_ELEMENTS:
        raise EdgeYoloError(f"{path}: refused, weight {name!r} claims {numel:,} elements, more than any YOLOv5 weight")
    if any(st < 1 for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        raise EdgeYoloError(f"{path}: refused, weight {name!r} has a zero or negative stride "
                            "(an expanded view that would grow when copied)")
    return numel


def check_state_dict(state, path: Path) -> dict:
    """Every entry a bounded tensor under a string name, before anything converts or copies one."""
    if not isinstance(state, dict):
        raise EdgeYoloError(f"{path}: refused, its state_dict is a {type(state).__name__}, not a mapping of tensors")
    total = 0
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise EdgeYoloError(f"{path}: refused, a weight name is a {type(name).__name__}, not a string")
        total += check_tensor(tensor, name, path)
        if total > MAX_TOTAL_ELEMENTS:
            raise EdgeYoloError(f"{path}: refused, its weights hold more than {MAX_TOTAL_ELEMENTS:,} elements")
    return state


def read_pickle_safely(path: Path):
    """``torch.load`` restricted to tensors, plain containers and our stand-ins."""
    if not path.is_file():
        raise EdgeYoloError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise EdgeYoloError(f"{path}: checkpoint file is empty")
    check_archive(path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise EdgeYoloError(
                f"{path}: refused, the checkpoint names '{found.group(1)}', which is not a tensor or a "
                "YOLOv5 class (nothing from it was run)"
            ) from None
        raise EdgeYoloError(f"{path}: corrupt or not a checkpoint ({_unpickler_reason(exc)})") from None
    except RecursionError:
        raise EdgeYoloError(f"{path}: refused, the checkpoint is nested too deeply") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError,
            TypeError, IndexError, MemoryError) as exc:
        raise EdgeYoloError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from None


def _unpickler_reason(exc: Exception) -> str:
    """The specific line of torch's long weights-only message (e.g. 'Unsupported operand 107')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return specific[0][:200] if specific else _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load an ultralytics YOLOv5 ``.pt`` or an edgeyolo checkpoint into our own float32 ``Model``."""
    path = Path(path)
    ckpt = read_pickle_safely(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == OWN_FORMAT:
        return _from_own_format(ckpt, path)
    record = _pick_model_record(ckpt, path)
    cfg = getattr(record, "yaml", None)
    if not isinstance(cfg, dict):
        raise EdgeYoloError(f"{path}: the pickled model carries no YOLOv5 architecture ('yaml' dict)")
    state = check_state_dict(module_state_dict(record), path)
    dtype = next((str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()), "float32")
    model = _build(cfg, state, path)
    try:
        copy_module_settings(model, record)
    except (TypeError, ValueError, AttributeError) as exc:
        raise EdgeYoloError(f"{path}: malformed layer settings ({_first_line(exc)})") from None
    model.names = _names(getattr(record, "names", None), model.detect.nc)
    return LoadedCheckpoint(model=model, names=model.names, source=str(path), original_dtype=dtype)


def _pick_model_record(ckpt, path: Path) -> PickledObject:
    if isinstance(ckpt, PickledObject):
        candidates = [ckpt]
    elif isinstance(ckpt, dict):
        candidates = [ckpt.get("ema"), ckpt.get("model")]
    else:
        candidates = []
    for record in candidates:
        if isinstance(record, PickledObject) and record.pickled_name in (
            "models.yolo.Model", "models.yolo.DetectionModel"
        ):
            return record
    raise EdgeYoloError(f"{path}: not a YOLOv5 detection checkpoint (no models.yolo.Model in 'model' or 'ema')")


def module_state_dict(record: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict a pickled ``nn.Module`` would give, read from its recorded attributes."""
    state: dict[str, torch.Tensor] = {}
    non_persistent = getattr(record, "_non_persistent_buffers_set", set()) or set()
    for key, value in (getattr(record, "_parameters", None) or {}).items():
        if isinstance(value, torch.Tensor):
            state[prefix + key] = value.detach()
    for key, value in (getattr(record, "_buffers", None) or {}).items():
        if isinstance(value, torch.Tensor) and key not in non_persistent:
            state[prefix + key] = value
    for key, child in (getattr(record, "_modules", None) or {}).items():
        if isinstance(child, PickledObject):
            state.update(module_state_dict(child, f"{prefix}{key}."))
    return state


def copy_module_settings(model: torch.nn.Module, record: PickledObject) -> None:
    """Carry over what a state_dict lacks: BatchNorm eps/momentum and each activation's type."""
    from .yolo import ACTIVATIONS

    records, pending = {}, [("", record)]
    while pending:
        path, rec = pending.pop()
        records[path] = rec
        for key, child in (getattr(rec, "_modules", None) or {}).items():
            if isinstance(child, PickledObject):
                pending.append((f"{path}.{key}" if path else key, child))
    for path, module in model.named_modules():
        rec = records.get(path)
        if rec is None:
            continue
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = _finite(getattr(rec, "eps", module.eps), "BatchNorm eps")
            momentum = getattr(rec, "momentum", module.momentum)
            module.momentum = None if momentum is None else _finite(momentum, "BatchNorm momentum")
        act = getattr(rec, "_modules", {}).get("act") if hasattr(module, "act") else None
        if isinstance(act, PickledObject):
            kind = act.pickled_name.rsplit(".", 1)[-1]
            if kind in ACTIVATIONS and type(module.act).__name__ != kind:
                slope = _finite(getattr(act, "negative_slope", 0.01), "LeakyReLU slope")
                module.act = ACTIVATIONS[kind](slope) if kind == "LeakyReLU" else ACTIVATIONS[kind]()


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return float(value)


def _build(cfg: dict, state: dict[str, torch.Tensor], path: Path) -> Model:
    try:
        model = Model(cfg)
    except EdgeYoloError as exc:
        raise EdgeYoloError(f"{path}: {exc}") from None
    except Exception as exc:  # malformed architecture values
        raise EdgeYoloError(f"{path}: cannot build a YOLOv5 model from its architecture ({_first_line(exc)})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EdgeYoloError(f"{path}: weights do not fit the YOLOv5 architecture ({_first_line(exc)})") from None
    return model.float().eval()


def _names(names, nc: int) -> list[str]:
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names)]
        except TypeError:  # keys of mixed types
            names = None
    if not isinstance(names, (list, tuple)) or len(names) != nc:
        return [f"class{i}" for i in range(nc)]
    return [str(n) for n in names]


def _from_own_format(ckpt: dict, path: Path) -> LoadedCheckpoint:
    if not isinstance(ckpt.get("yaml"), dict):
        raise EdgeYoloError(f"{path}: the checkpoint carries no YOLOv5 architecture ('yaml' dict)")
    model = _build(ckpt["yaml"], check_state_dict(ckpt.get("state_dict"), path), path)
    model.names = _names(ckpt.get("names"), model.detect.nc)
    return LoadedCheckpoint(model=model, names=model.names, source=str(path), original_dtype="float32")


def save_checkpoint(model: Model, path: str | Path, **extra) -> Path:
    """Save in edgeyolo's own format: plain tensors and dicts, loadable with ``weights_only``."""
    path = Path(path)
    payload = {
        "format": OWN_FORMAT,
        "yaml": model.yaml,
        "names": list(model.names),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path
