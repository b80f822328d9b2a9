"""``build``: weights → our model → ONNX → a backend's engine → a bundle folder.

This is the whole compiler walk of the design; every step lives in its own room
and this module only strings them together and writes the manifest.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .backends import backend_module
from .bundle import Bundle, BundleWriter, is_bundle, load_bundle, sha256_file
from .errors import EdgeYoloError
from .export import INPUT_NAME, OUTPUT_NAME, ExportOptions, check_imgsz, export_onnx
from .log import log
from .model import load_model, resolve_weights
from .progress import note, step
from .portable import compile_portable  # noqa: F401 - its home before the device needed it torch-free
from .runtime.preprocess import LetterboxSettings
from .swap import clean_stale_temp
from .targets import Target, load_target

EXPORT_PREFIX = "edgeyolo-export-"
# temp work folders named "<prefix><pid>-*" by the build's steps (export, Q/DQ quantisation, TFLite conversion)
WORK_PREFIXES = (EXPORT_PREFIX, "edgeyolo-calibrate-", "edgeyolo-quantize-", "edgeyolo-tflite-")


@dataclass
class BuildOptions:
    imgsz: int | tuple[int, int] | None = None  # default: the target's
    dynamic_batch: bool | None = None
    dynamic_shape: bool | None = None


def build_bundle(weights, target: str | Path | Target, out: str | Path, options: BuildOptions = BuildOptions(),
                 calibration=None, gate=None) -> Bundle:
    """Compile ``weights`` for ``target`` into the bundle folder ``out`` (atomically).

    ``calibration`` (a ``CalibrationSet``) feeds INT8 builds; ``gate``, if given, is called
    with the built-but-uncommitted bundle and may raise to abort the build.
    """
    target = target if isinstance(target, Target) else load_target(target)
    if target.needs_calibration and calibration is None:
        raise EdgeYoloError(f"target {target.name} is INT8 and needs calibration images (--calib)")
    backend = backend_module(target.backend)
    weights_path = resolve_weights(weights)
    checkpoint = load_model(weights_path)
    model = checkpoint.model
    stride = model.imgsz_multiple
    imgsz = check_imgsz(options.imgsz or target.imgsz, stride)
    dynamic_shape = target.dynamic_shape if options.dynamic_shape is None else options.dynamic_shape
    dynamic_batch = dynamic_shape or (target.dynamic_batch if options.dynamic_batch is None else options.dynamic_batch)
    export_options = ExportOptions(imgsz=imgsz, opset=target.opset, head=target.head, batch=target.batch,
                                   dynamic_batch=dynamic_batch, dynamic_shape=dynamic_shape)
    letterbox = LetterboxSettings(imgsz=imgsz, auto=dynamic_shape, stride=stride)

    for prefix in WORK_PREFIXES:  # what builds killed with SIGKILL left in the temp folder
        clean_stale_temp(prefix)
    with tempfile.TemporaryDirectory(prefix=f"{EXPORT_PREFIX}{os.getpid()}-") as work, BundleWriter(out) as writer:
        with step(f"exporting {weights_path.name} to ONNX at {imgsz[0]}x{imgsz[1]} ({target.head} head)"):
            onnx_path = export_onnx(model, Path(work) / "model.onnx", export_options)
        with step(f"building the {target.backend} engine for {target.name}"):
            result = backend.build(onnx_path, target, writer.tmp, calibration)
        manifest = compose_manifest(checkpoint, weights_path, target, export_options, letterbox, result, calibration)
        if gate is not None:
            gate(Bundle(path=writer.tmp, manifest=manifest))
        return writer.commit(manifest)


def compose_manifest(checkpoint, weights_path: Path, target: Target, export: ExportOptions,
                     letterbox: LetterboxSettings, result, calibration) -> dict:
    head = checkpoint.model.describe()
    h, w = export.imgsz
    rows = sum((h // s) * (w // s) * (len(a) // 2) for s, a in zip(head["strides"], head["anchors"]))
    batch = "batch" if export.dynamic_batch else export.batch
    manifest = {
        "edgeyolo_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target.to_dict(),
        "source": {"weights": str(weights_path), "sha256": sha256_file(weights_path),
                   "dtype": checkpoint.original_dtype},
        "names": head["names"],
        "input": {"name": INPUT_NAME, "shape": [batch, 3, "height" if export.dynamic_shape else h,
                                                "width" if export.dynamic_shape else w],
                  "layout": "NCHW", "dtype": "float32", "dynamic_batch": export.dynamic_batch,
                  "dynamic_shape": export.dynamic_shape, **result.input},
        "preprocess": letterbox.to_dict(),
        "output": {"name": OUTPUT_NAME, "head": export.head, "shape": [batch, rows, head["nc"] + 5],
                   "nc": head["nc"], "strides": head["strides"], "anchors": head["anchors"], **result.output},
        "backend": {"name": target.backend, "files": result.files, "options": target.backend_options,
                    **result.info},
        "calibration": ({**calibration.describe(), "keep_float": list(target.calibration.get("keep_float", []))}
                        if calibration is not None else None),
        "accuracy": None,
    }
    return manifest


def cached_reference_bundle(weights, target: str = "cpu-fp32") -> Bundle:
    """A bundle for ``weights`` built once into the cache (so ``detect yolov5n.pt`` just works)."""
    from .model.weights import cache_dir

    if Path(str(weights)).is_dir():
        raise EdgeYoloError(f"{weights}: a folder that is not a bundle (no manifest.json) and not a weights file")
    weights_path = resolve_weights(weights)
    digest = sha256_file(weights_path)[:16]
    out = cache_dir() / "bundles" / f"{weights_path.stem}-{digest}-{target}"
    if is_bundle(out):
        try:
            return load_bundle(out)
        except EdgeYoloError:
            log.warning("cached bundle %s is damaged; rebuilding it", out)
    note("building a %s bundle for %s once, cached in %s", target, weights_path.name, out)
    return build_bundle(weights_path, target, out)


def prepare_calibration(weights, target: Target, spec, size=None, seed: int = 0, imgsz=None):
    """The calibration set for ``target``, letterboxed exactly as the built engine's inputs will be."""
    from .calibration import DEFAULT_SIZE, load_calibration
    from .model.weights import resolve_weights as _resolve

    stride = _max_stride(_resolve(weights))
    letterbox = LetterboxSettings(imgsz=check_imgsz(imgsz or target.imgsz, stride), auto=False, stride=stride)
    calib = target.calibration
    return load_calibration(spec, letterbox, size=size, seed=seed if seed else int(calib.get("seed", 0)),
                            default_size=int(calib.get("size", DEFAULT_SIZE)))


def _max_stride(weights_path: Path) -> int:
    return load_model(weights_path).model.imgsz_multiple
