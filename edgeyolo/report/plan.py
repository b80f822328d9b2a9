"""What a report measures: every (model x target x image size) cell, and the bundle cached for each.

A cell's bundle lives under ``REPORT_DIR/bundles`` in a folder named by a content key (the
weights' sha256, the target file's bytes, the image size and the calibration spec), so a rerun
finds it and only measures, and any change to those inputs builds afresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..bundle import sha256_file
from ..model import resolve_weights
from ..targets import Target, load_target

BASELINE_TARGET = "cpu-fp32"


@dataclass(frozen=True)
class CalibSpec:
    source: str | None = None
    size: int | None = None
    seed: int = 0

    def key_part(self) -> str:
        if self.source is None:
            return "none"
        source = Path(self.source)
        return f"{source.resolve() if source.exists() else self.source}|{self.size}|{self.seed}"


@dataclass(frozen=True)
class Cell:
    model: str  # the name shown in the report (the weights' stem)
    weights: str
    weights_sha256: str
    target: str
    target_path: str  # the target file ("" where the target could not be read)
    target_error: str | None
    imgsz: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.target}/{self.imgsz}"

    def key(self, calib: CalibSpec) -> str:
        """The content key of this cell's bundle."""
        target_bytes = Path(self.target_path).read_bytes() if self.target_path else b""
        digest = hashlib.sha256()
        for part in (self.weights_sha256.encode(), target_bytes, str(self.imgsz).encode(),
                     calib.key_part().encode() if self.needs_calibration else b"-"):
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()[:16]

    @property
    def needs_calibration(self) -> bool:
        if not self.target_path:
            return False
        return load_target(self.target_path).needs_calibration

    def bundle_dir(self, root: Path, calib: CalibSpec) -> Path:
        return root / "bundles" / f"{self.model}-{self.target}-{self.imgsz}-{self.key(calib)}"


def model_names(weights: list[str]) -> list[str]:
    """Short, unique names for the models: the weights' stems (with the parent folder where stems clash)."""
    stems = [Path(w).stem for w in weights]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(w).parent.name}-{Path(w).stem}" for w in weights]


def plan_cells(weights: list[str], targets: list[str], sizes: list[int]) -> list[Cell]:
    """Every cell, the cpu-fp32 baseline included for each model and size (the drop is measured against it).

    A target that cannot be read still yields cells: they become rows with the reason.
    """
    if BASELINE_TARGET not in targets:
        targets = [BASELINE_TARGET, *targets]
    resolved = [(str(resolve_weights(w)), w) for w in weights]
    names = model_names([w for _, w in resolved])
    cells = []
    for (path, _), name in zip(resolved, names):
        sha = sha256_file(Path(path))
        for size in sizes:
            for spec in targets:
                target_name, target_path, error = _read_target(spec)
                cells.append(Cell(model=name, weights=path, weights_sha256=sha, target=target_name,
                                  target_path=target_path, target_error=error, imgsz=size))
    return cells


def _read_target(spec: str) -> tuple[str, str, str | None]:
    from ..errors import EdgeYoloError

    try:
        target: Target = load_target(spec)
    except EdgeYoloError as exc:
        return Path(spec).stem, "", str(exc)
    return target.name, target.path, None


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
