"""ONNX Runtime: the reference CPU backend. The bundle holds the ONNX itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from . import BuildResult, require

NAME = "onnxruntime"
ENGINE_FILE = "model.onnx"

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def build(onnx_path: Path, target, out_dir: Path, calibration=None) -> BuildResult:
    ort = require("onnxruntime", NAME)
    if target.precision != "fp32":
        raise NotImplementedError(f"onnxruntime {target.precision} builds are not supported")
    shutil.copyfile(onnx_path, out_dir / ENGINE_FILE)
    return BuildResult(files={"engine": ENGINE_FILE, "onnx": ENGINE_FILE}, info={"version": ort.__version__})


def session_options(threads: int = 0, graph_optimization: str = "all"):
    ort = require("onnxruntime", NAME)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
    return options


class Engine:
    """An ``InferenceSession`` over the bundle's ONNX file (any ONNX the bundle names as ``onnx``)."""

    def __init__(self, bundle, threads: int | None = None, providers: list[str] | None = None, **_):
        ort = require("onnxruntime", NAME)
        opts = bundle.manifest.get("backend", {}).get("options", {})
        threads = opts.get("intra_op_threads", 0) if threads is None else threads
        threads = int(os.environ.get("EDGEYOLO_THREADS", threads))
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(bundle.file("onnx")), session_options(threads, opts.get("graph_optimization", "all")),
            providers=providers,
        )
        self.input_name = self.session.get_inputs()[0].name
        self.info = {"backend": NAME, "version": ort.__version__, "providers": self.session.get_providers(),
                     "threads": threads or os.cpu_count()}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
