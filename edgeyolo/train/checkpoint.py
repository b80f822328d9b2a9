"""Training checkpoints: what a run writes as ``last`` / ``best`` and what ``--resume`` reads back.

A training checkpoint ``STEM`` is two safetensors files, neither a pickle:

- ``STEM.safetensors``: an ordinary edgeyolo model checkpoint (``edgeyolo.model.native``) of the
  EMA weights (or the model's, without EMA), with hyp, epoch, metrics and data hashes in its
  description. Every command that takes weights accepts it.
- ``STEM.state.safetensors``: what resuming needs on top: the raw (non-EMA) training weights as
  ``model/<name>``, the optimiser's per-parameter tensors as ``optim/<index>/<key>``, and in its
  metadata JSON the epoch, best fitness, EMA update count, the optimiser's parameter groups and
  non-tensor state, a free-form ``extra`` object (scheduler, command line, ...) and the sha256 of
  the model file, so a state never pairs with another run's weights.

Both files are written through a temporary file and a rename; the model file last, so an
interrupted save leaves the previous pair mismatched and refused, never silently mixed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import sha256_file
from ..errors import EdgeYoloError
from ..model.native import SUFFIX, NativeCheckpoint, load_native, save_model
from ..model.safetensors_file import (
    read_header,
    read_metadata_json,
    read_tensors,
    write_atomically,
)

STATE_FORMAT = "edgeyolo-train-state"
STATE_VERSION = 1
STATE_KEY = "edgeyolo-train"
STATE_SUFFIX = ".state.safetensors"
_MAX_STATE_BYTES = 16 << 30
_OPTIM_TENSOR = re.compile(r"optim/(\d+)/(\w+)")


def paths_for(stem: str | Path) -> tuple[Path, Path]:
    """``(STEM.safetensors, STEM.state.safetensors)`` for a stem or either file's path."""
    stem = Path(stem)
    name = stem.name.removesuffix(STATE_SUFFIX).removesuffix(SUFFIX)
    return stem.with_name(name + SUFFIX), stem.with_name(name + STATE_SUFFIX)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@dataclass
class TrainingState:
    """A training checkpoint read back: the EMA/deploy model plus everything resuming needs."""

    checkpoint: NativeCheckpoint  # .model: the EMA weights (rebuilt with the recorded widths)
    model_state: dict[str, torch.Tensor] | None  # raw training weights; None when saved without EMA
    optimizer_state: dict | None  # ready for ``optimizer.load_state_dict``
    epoch: int
    best_fitness: float | None
    ema_updates: int
    extra: dict = field(default_factory=dict)

    @property
    def hyp(self) -> dict | None:
        return self.checkpoint.description.get("hyp")

    def apply(self, model: nn.Module, ema: nn.Module | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the saved weights / EMA / optimiser into freshly built ones; a mismatch is one-line error."""
        source = self.checkpoint.source
        _load_exact(_unwrap(model), self.model_state or self.checkpoint.model.state_dict(), source, "model")
        if ema is not None:
            _load_exact(_unwrap(ema), self.checkpoint.model.state_dict(), source, "EMA")
        if optimizer is not None:
            if self.optimizer_state is None:
                raise EdgeYoloError(f"{source}: saved without optimiser state; cannot resume the optimiser")
            _check_optimizer_fits(optimizer, self.optimizer_state, source)
            optimizer.load_state_dict(self.optimizer_state)


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    own = module.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        bad = next((k for k in sorted(set(own) | set(state))
                    if k not in own or k not in state or own[k].shape != state[k].shape), "?")
        raise EdgeYoloError(f"{source}: the saved {what} does not fit this model (first difference: {bad!r}); "
                            "is this a run of another model?")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict, source: str) -> None:
    groups = optimizer.param_groups
    if len(groups) != len(saved["param_groups"]) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved["param_groups"])):
        raise EdgeYoloError(f"{source}: the saved optimiser has other parameter groups; is this a run of another model?")
    params = [p for g in groups for p in g["params"]]
    index = {i: p for i, p in zip((i for s in saved["param_groups"] for i in s["params"]), params)}
    for i, state in saved["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() and value.shape != index[i].shape:
                raise EdgeYoloError(f"{source}: the saved optimiser state '{key}' of parameter {i} does not fit")


# ---------------------------------------------------------------- writing

def save_training_state(stem: str | Path, *, model: nn.Module, ema: nn.Module | None = None,
                        optimizer: torch.optim.Optimizer | None = None, epoch: int,
                        best_fitness: float | None = None, ema_updates: int = 0, hyp: dict | None = None,
                        metrics: dict | None = None, data: dict | None = None, meta: dict | None = None,
                        extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (EMA or model, deployable) and ``STEM.state.safetensors`` (for resume).

    ``extra`` is any JSON-able object (scheduler state, the command line ...). Returns both paths.
    """
    model_path, state_path = paths_for(stem)
    deploy = _unwrap(ema if ema is not None else model)
    tensors: dict[str, torch.Tensor] = {}
    if ema is not None:
        tensors.update({f"model/{k}": v.float() if v.is_floating_point() else v
                        for k, v in _unwrap(model).state_dict().items()})
    optim_json = None
    if optimizer is not None:
        optim_tensors, optim_json = _split_optimizer_state(optimizer.state_dict())
        tensors.update(optim_tensors)
    record = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": int(epoch),
        "best_fitness": None if best_fitness is None else float(best_fitness),
        "ema_updates": int(ema_updates), "has_model": ema is not None, "optimizer": optim_json,
        "extra": extra or {},
    }
    tmp_model = model_path.with_name(f".{model_path.stem}.pending{SUFFIX}")
    try:
        save_model(deploy, tmp_model, hyp=hyp, epoch=int(epoch), metrics=metrics, data=data, meta=meta)
        record["model_sha256"] = sha256_file(tmp_model)
        try:
            metadata = {STATE_KEY: json.dumps(record, allow_nan=False)}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training state 'extra' must be plain JSON: {exc}") from None
        write_atomically(state_path, tensors, metadata)
        tmp_model.replace(model_path)
    finally:
        tmp_model.unlink(missing_ok=True)
    return model_path, state_path


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim/{int(index)}/{key}"] = value
            else:
                scalars.setdefault(str(int(index)), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


# ---------------------------------------------------------------- reading

def load_training_state(stem: str | Path) -> TrainingState:
    """Read a training checkpoint (stem or either file); everything validated before tensors are read."""
    model_path, state_path = paths_for(stem)
    for path in (model_path, state_path):
        if not path.is_file():
            raise EdgeYoloError(f"{path}: no such file (a training checkpoint is {model_path.name} + {state_path.name})")
    header = read_header(state_path, max_data_bytes=_MAX_STATE_BYTES)
    record = read_metadata_json(state_path, header, STATE_KEY, "training state")
    _validate_record(record, header, state_path)
    if sha256_file(model_path) != record["model_sha256"]:
        raise EdgeYoloError(f"{state_path}: belongs to another {model_path.name} (another run, or an interrupted save)")
    checkpoint = load_native(model_path)
    expected_model = {f"model/{k}": tuple(v.shape) for k, v in checkpoint.model.state_dict().items()}
    found_model = {k: t.shape for k, t in header.tensors.items() if k.startswith("model/")}
    if record["has_model"] and found_model != expected_model:
        bad = sorted(set(found_model) ^ set(expected_model)) or sorted(
            k for k in found_model if found_model[k] != expected_model[k])
        raise EdgeYoloError(f"{state_path}: training weights do not match the model file ({bad[0]!r})")
    tensors = read_tensors(state_path)
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")} or None
    optimizer_state = None
    if record["optimizer"] is not None:
        optimizer_state = _join_optimizer_state(record["optimizer"], tensors)
    return TrainingState(checkpoint=checkpoint, model_state=model_state, optimizer_state=optimizer_state,
                         epoch=record["epoch"], best_fitness=record["best_fitness"],
                         ema_updates=record["ema_updates"], extra=record["extra"])


def _join_optimizer_state(optim: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        match = _OPTIM_TENSOR.fullmatch(name)
        if match:
            state.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for index, values in optim["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in optim["param_groups"]]
    return {"state": state, "param_groups": groups}


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, list) and depth < 2:
        return len(value) <= 100_000 and all(_plain(v, depth + 1) for v in value)
    return False


def _validate_record(record: dict, header, path: Path) -> None:
    def fail(msg: str):
        raise EdgeYoloError(f"{path}: training state: {msg}")

    keys = {"format", "version", "epoch", "best_fitness", "ema_updates", "has_model", "optimizer", "extra",
            "model_sha256"}
    if record.get("format") != STATE_FORMAT or record.get("version") != STATE_VERSION:
        fail(f"not an {STATE_FORMAT} version {STATE_VERSION} file")
    if set(record) != keys:
        fail(f"keys must be {', '.join(sorted(keys))}")
    if not isinstance(record["epoch"], int) or isinstance(record["epoch"], bool) or record["epoch"] < -1:
        fail("epoch must be an integer")
    if record["best_fitness"] is not None and not _plain(record["best_fitness"]):
        fail("best_fitness must be a number")
    if not isinstance(record["ema_updates"], int) or record["ema_updates"] < 0:
        fail("ema_updates must be a non-negative integer")
    if not isinstance(record["has_model"], bool) or not isinstance(record["extra"], dict):
        fail("has_model must be a boolean and extra an object")
    if not isinstance(record["model_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", record["model_sha256"]):
        fail("model_sha256 must be a sha256 hex digest")
    optim_indices: set[int] = set()
    optim = record["optimizer"]
    if optim is not None:
        if not isinstance(optim, dict) or set(optim) != {"param_groups", "scalars"}:
            fail("optimizer must hold param_groups and scalars")
        groups = optim["param_groups"]
        if not isinstance(groups, list) or not 1 <= len(groups) <= 100:
            fail("optimizer param_groups must be a list of 1..100 groups")
        for group in groups:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                fail("every optimizer param group needs a params list")
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1_000_000 for i in group["params"]):
                fail("optimizer params must be parameter indices")
            optim_indices.update(group["params"])
            if not all(isinstance(k, str) and (k == "params" or _plain(v)) for k, v in group.items()):
                fail("optimizer group values must be numbers, booleans, strings or lists")
        scalars = optim["scalars"]
        if not isinstance(scalars, dict) or not all(
                k.isdigit() and int(k) in optim_indices and isinstance(v, dict) and all(_plain(x) for x in v.values())
                for k, v in scalars.items()):
            fail("optimizer scalars must map parameter indices to numbers")
    for name in header.tensors:
        if name.startswith("model/") and record["has_model"]:
            continue
        match = _OPTIM_TENSOR.fullmatch(name)
        if not match or int(match.group(1)) not in optim_indices:
            fail(f"unexpected tensor {name!r}")
