"""Target profiles: TOML files in the top-level ``targets/`` folder (or any path a user gives)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgeYoloError

PRECISIONS = ("fp32", "fp16", "int8")


def data_dir(name: str) -> Path:
    """A top-level data folder (``targets``, ``calibration``): in a checkout, or inside the installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise EdgeYoloError(f"the {name}/ folder is missing from this installation")


def targets_dir() -> Path:
    return data_dir("targets")


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    precision: str
    description: str = ""
    imgsz: tuple[int, int] = (640, 640)
    batch: int = 1
    dynamic_batch: bool = False
    dynamic_shape: bool = False
    head: str = "decoded"
    opset: int = 17
    calibration: dict = field(default_factory=dict)
    backend_options: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    path: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.precision == "int8"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "backend": self.backend, "precision": self.precision,
            "description": self.description, "imgsz": list(self.imgsz), "batch": self.batch,
            "dynamic_batch": self.dynamic_batch, "dynamic_shape": self.dynamic_shape, "head": self.head,
            "opset": self.opset, "calibration": self.calibration, "backend_options": self.backend_options,
            "runtime": self.runtime,
        }


def list_targets() -> list[Target]:
    return [read_target(p) for p in sorted(targets_dir().glob("*.toml"), key=lambda p: p.stem)]


def load_target(spec: str | Path) -> Target:
    """A target by name (``jetson-int8``) or by path to a ``.toml`` file."""
    spec = str(spec)
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise EdgeYoloError(f"{spec}: no such target file")
        return read_target(path)
    candidate = targets_dir() / f"{spec}.toml"
    if not candidate.is_file():
        known = ", ".join(p.stem for p in sorted(targets_dir().glob("*.toml")))
        raise EdgeYoloError(f"unknown target {spec!r} (known: {known}; or pass a path to a .toml file)")
    return read_target(candidate)


def read_target(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeYoloError(f"{path}: not valid TOML ({exc})") from None
    try:
        imgsz = data.get("imgsz", 640)
        imgsz = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
        target = Target(
            name=str(data.get("name", path.stem)),
            backend=str(data["backend"]),
            precision=str(data["precision"]),
            description=str(data.get("description", "")),
            imgsz=tuple(int(x) for x in imgsz),
            batch=int(data.get("batch", 1)),
            dynamic_batch=bool(data.get("dynamic_batch", False)),
            dynamic_shape=bool(data.get("dynamic_shape", False)),
            head=str(data.get("head", "decoded")),
            opset=int(data.get("opset", 17)),
            calibration=dict(data.get("calibration", {})),
            backend_options=dict(data.get(data["backend"], {})),
            runtime=dict(data.get("runtime", {})),
            path=str(path),
        )
    except KeyError as exc:
        raise EdgeYoloError(f"{path}: target file lacks the required key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise EdgeYoloError(f"{path}: malformed target file ({exc})") from None
    if target.precision not in PRECISIONS:
        raise EdgeYoloError(f"{path}: precision must be one of {', '.join(PRECISIONS)}, not {target.precision!r}")
    return target
