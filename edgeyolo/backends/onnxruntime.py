"""ONNX Runtime: the reference CPU backend. The bundle holds the ONNX itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import EdgeYoloError
from . import BuildResult, image_input, require

NAME = "onnxruntime"
ENGINE_FILE = "model.onnx"

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def build(onnx_path: Path, target, out_dir: Path, calibration=None) -> BuildResult:
    ort = require("onnxruntime", NAME)
    if target.precision == "int8":
        result = _build_int8(onnx_path, target, out_dir, calibration, ort.__version__)
    elif target.precision == "fp32":
        shutil.copyfile(onnx_path, out_dir / ENGINE_FILE)
        result = BuildResult(files={"engine": ENGINE_FILE, "onnx": ENGINE_FILE}, info={"version": ort.__version__})
    else:
        raise EdgeYoloError(f"onnxruntime targets are fp32 or int8, not {target.precision}")
    if target.backend_options.get(image_input.OPTION, True):  # after quantising, which calibrates on floats
        result.input = image_input.manifest_input(image_input.prepend_to_onnx(out_dir / ENGINE_FILE))
    return result


def _build_int8(onnx_path: Path, target, out_dir: Path, calibration, version: str) -> BuildResult:
    """The explicit-INT8 (Q/DQ) ONNX, run by ONNX Runtime's integer CPU kernels."""
    from ..quantize import QuantizeSettings, quantize_onnx

    if calibration is None:
        raise EdgeYoloError(f"target {target.name} is INT8 and needs calibration images (--calib)")
    facts = quantize_onnx(onnx_path, out_dir / ENGINE_FILE, calibration, QuantizeSettings.from_target(target))
    return BuildResult(files={"engine": ENGINE_FILE, "onnx": ENGINE_FILE},
                       info={"version": version, "quantization": facts})


def session_options(threads: int = 0, graph_optimization: str = "all", spinning: bool = False):
    """Session options; ``spinning=False`` lets idle pool threads sleep at once (ONNX Runtime's
    default busy-waits after each run, taking the core the caller's letterbox and NMS need:
    on this 2-core machine, shared, that halved end-to-end FPS).

    The memory pattern is off: with it every run takes one block for all its intermediate
    tensors from the arena, and concurrent runs (``Detector.stream``) each grow the arena by a
    whole block (peak RSS of a depth-3 stream over 100 images: cpu-int8 269 -> 215 MB,
    cpu-fp32 215 -> 202 MB; sync 157 -> 136 MB), while tensors allocated one by one reuse
    the arena's freed chunks. CPU time per frame was the same within noise (sync and stream).
    """
    ort = require("onnxruntime", NAME)
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class Engine:
    """An ``InferenceSession`` over the bundle's ONNX file (any ONNX the bundle names as ``onnx``).

    Safe from several threads without a lock: ``InferenceSession.run`` is thread-safe in ONNX Runtime.
    """

    def __init__(self, bundle, threads: int | None = None, providers: list[str] | None = None, **_):
        ort = require("onnxruntime", NAME)
        opts = bundle.manifest.get("backend", {}).get("options", {})
        threads = opts.get("intra_op_threads", 0) if threads is None else threads
        threads = int(os.environ.get("EDGEYOLO_THREADS", threads))
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(bundle.file("onnx")),
            session_options(threads, opts.get("graph_optimization", "all"), opts.get("allow_spinning", False)),
            providers=providers,
        )
        self.input_name = self.session.get_inputs()[0].name
        self.info = {"backend": NAME, "version": ort.__version__, "providers": self.session.get_providers(),
                     "threads": threads or os.cpu_count()}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
