"""Build a cell's bundle unless the cache already holds it; a failed build is a reason, not a crash."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..bundle import is_bundle, load_bundle
from ..errors import EdgeYoloError
from ..log import log
from .plan import CalibSpec, Cell


@dataclass
class BuildOutcome:
    bundle: str | None
    build_s: float | None
    cached: bool
    error: str | None = None


def ensure_bundle(cell: Cell, root: Path, calib: CalibSpec) -> BuildOutcome:
    if cell.target_error:
        return BuildOutcome(None, None, False, cell.target_error)
    dest = cell.bundle_dir(root, calib)
    if is_bundle(dest):
        try:
            bundle = load_bundle(dest)
            return BuildOutcome(str(dest), bundle.manifest.get("report", {}).get("build_s"), True)
        except EdgeYoloError:
            log.warning("cached bundle %s is damaged; rebuilding it", dest)
    start = time.perf_counter()
    try:
        bundle = _build(cell, dest, calib)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # any failure of one cell becomes that row's reason
        log.info("building %s failed", cell.id, exc_info=True)
        return BuildOutcome(None, None, False, _one_line(exc))
    build_s = round(time.perf_counter() - start, 1)
    bundle.update_manifest(report={"build_s": build_s})
    return BuildOutcome(str(dest), build_s, False)


def _build(cell: Cell, dest: Path, calib: CalibSpec):
    from ..build import BuildOptions, build_bundle, prepare_calibration
    from ..targets import load_target

    target = load_target(cell.target_path)
    size = (cell.imgsz, cell.imgsz)
    calibration = None
    if target.needs_calibration:
        if calib.source is None:
            raise EdgeYoloError(f"target {target.name} is INT8: pass calibration images with --calib")
        calibration = prepare_calibration(cell.weights, target, calib.source, calib.size, calib.seed, size)
    return build_bundle(cell.weights, target, dest, BuildOptions(imgsz=size), calibration=calibration)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
