"""Compiled engines, kept beside the bundle and keyed by what they are tied to.

A TensorRT engine runs only with the TensorRT version and the GPU (compute capability)
it was built for. Each engine is stored as ``<slug>.engine`` with a ``<slug>.json``
sidecar holding its key and sha256; loading looks for the key of *this* device and,
failing that, says which device the engines it did find were built for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ...bundle import sha256_file
from ...errors import EdgeYoloError
from ...log import log

ENGINES_DIR = "engines"
DEVICE_FIELDS = ("tensorrt", "gpu", "compute_capability", "dla_core")


def user_cache_dir() -> Path:
    """``$EDGEYOLO_CACHE/tensorrt`` (``~/.cache/edgeyolo/tensorrt``); the runtime must not import the model package."""
    root = os.environ.get("EDGEYOLO_CACHE") or Path.home() / ".cache" / "edgeyolo"
    return Path(root) / "tensorrt"


@dataclass(frozen=True)
class EngineKey:
    """Everything a compiled engine depends on."""

    tensorrt: str  # TensorRT version, e.g. "10.3.0"
    gpu: str  # device name, e.g. "Orin" or "NVIDIA GeForce RTX 4090"
    compute_capability: str  # "8.7"
    dla_core: int  # -1: GPU
    mode: str  # fp16 | fp32 | int8-explicit | int8-implicit
    source_sha256: str  # the ONNX compiled
    settings: str = ""  # digest of build settings that change the engine (batch profile, calibration cache)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def slug(self) -> str:
        """A readable, unique file stem: ``trt10.3.0-orin-sm87-int8-explicit-1a2b3c4d5e``."""
        dla = f"-dla{self.dla_core}" if self.dla_core >= 0 else ""
        return (f"trt{_slugify(self.tensorrt)}-{_slugify(self.gpu)}-sm{self.compute_capability.replace('.', '')}"
                f"{dla}-{self.mode}-{self.digest()[:10]}")

    def device(self) -> str:
        dla = f", DLA core {self.dla_core}" if self.dla_core >= 0 else ""
        return f"TensorRT {self.tensorrt} on {self.gpu} (sm {self.compute_capability}{dla})"

    def same_device(self, other: "EngineKey") -> bool:
        return all(getattr(self, f) == getattr(other, f) for f in DEVICE_FIELDS)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineKey":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class CachedEngine:
    key: EngineKey
    path: Path
    sha256: str
    meta: dict

    def verified(self) -> bool:
        return self.path.is_file() and sha256_file(self.path) == self.sha256


class EngineCache:
    """Engine files in one or more folders: the bundle's own ``engines/`` first, then the user cache."""

    def __init__(self, folders: list[Path]):
        self.folders = [Path(f) for f in folders]

    @classmethod
    def for_bundle(cls, bundle_path: Path) -> "EngineCache":
        return cls([Path(bundle_path) / ENGINES_DIR, user_cache_dir() / ENGINES_DIR])

    def entries(self) -> list[CachedEngine]:
        found = []
        for folder in self.folders:
            for sidecar in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    meta = json.loads(sidecar.read_text())
                    key = EngineKey.from_dict(meta["key"])
                    found.append(CachedEngine(key=key, path=sidecar.with_suffix(".engine"), sha256=meta["sha256"],
                                              meta=meta))
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("ignoring unreadable engine record %s", sidecar)
        return found

    def find(self, key: EngineKey) -> CachedEngine | None:
        """The engine built for exactly ``key`` whose file is intact."""
        for entry in self.entries():
            if entry.key == key:
                if entry.verified():
                    return entry
                log.warning("engine %s is missing or corrupted (sha256 mismatch); it will be rebuilt", entry.path)
        return None

    def built_elsewhere(self, key: EngineKey) -> list[CachedEngine]:
        """Engines of the same source compiled for another TensorRT/GPU (they cannot run here)."""
        return [e for e in self.entries() if e.key.source_sha256 == key.source_sha256 and not e.key.same_device(key)]

    def writable_folder(self) -> Path:
        """The first folder that exists or can be made and is writable (the last one otherwise)."""
        for folder in self.folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(folder, os.W_OK):
                return folder
        return self.folders[-1]

    def store(self, key: EngineKey, engine: bytes, meta: dict | None = None) -> Path:
        """Write the engine and its sidecar atomically into the first writable folder."""
        record = {"key": asdict(key), "sha256": hashlib.sha256(engine).hexdigest(),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {})}
        errors = []
        for folder in self.folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{key.slug()}.engine"
                _write_atomic(path, engine)
                _write_atomic(path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
                return path
            except OSError as exc:
                errors.append(f"{folder}: {exc.strerror or exc}")
        raise EdgeYoloError(f"cannot store the compiled engine anywhere ({'; '.join(errors)})")


def resolve(cache: EngineCache, key: EngineKey, allow_build: bool, bundle_name: str = "BUNDLE") -> Path | None:
    """The cached engine for ``key``, or None when one must be built (allowed), or a clear error (not allowed)."""
    hit = cache.find(key)
    if hit is not None:
        return hit.path
    elsewhere = cache.built_elsewhere(key)
    if elsewhere:
        devices = "; ".join(sorted({e.key.device() for e in elsewhere}))
        reason = f"the cached engine was compiled for {devices}, but this device runs {key.device()}"
    else:
        reason = f"no engine compiled for {key.device()} yet"
    if not allow_build:
        raise EdgeYoloError(f"{reason}; compile one here with: edgeyolo build {bundle_name}")
    log.warning("%s: compiling it from the ONNX (this takes minutes, once)", reason)
    return None


class FileCache:
    """One cache file (TensorRT's calibration or timing cache); absent or unreadable means empty."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> bytes | None:
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        return data or None

    def write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, bytes(data))
        except OSError as exc:
            log.warning("cannot write %s (%s); it will be recomputed next time", self.path, exc.strerror or exc)


def calibration_cache_key(calibration: dict, input_shape, source_sha256: str, algorithm: str, tensorrt: str) -> str:
    """Calibration caches are valid for the same images, preprocessing, network input, algorithm and TensorRT."""
    facts = {
        "images_sha256": calibration.get("images_sha256"), "images": calibration.get("images"),
        "seed": calibration.get("seed"), "preprocess": calibration.get("preprocess"),
        "input_shape": [str(d) for d in input_shape], "source_sha256": source_sha256,
        "algorithm": algorithm, "tensorrt": ".".join(tensorrt.split(".")[:2]),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def calibration_cache(folder: Path, key: str) -> FileCache:
    return FileCache(Path(folder) / f"calibration-{key}.cache")


def timing_cache(tensorrt: str, gpu: str, compute_capability: str) -> FileCache:
    """Kernel timings for this TensorRT and GPU, shared by every build on the device."""
    name = f"timing-trt{_slugify(tensorrt)}-{_slugify(gpu)}-sm{compute_capability.replace('.', '')}.cache"
    return FileCache(user_cache_dir() / name)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
