"""The LiteRT engine: a ``.tflite`` model on the XNNPACK delegate. No tensorflow, no torch."""

from __future__ import annotations

import os
import threading

import numpy as np

from ...errors import EdgeYoloError
from .. import require

NAME = "tflite"


def litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"


def open_interpreter(model_path, threads: int):
    """A LiteRT interpreter with its tensors allocated (XNNPACK is LiteRT's default CPU delegate)."""
    require("ai_edge_litert", NAME)
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
    except ValueError as exc:
        raise EdgeYoloError(f"{model_path}: LiteRT cannot load this model ({exc})") from None
    interpreter.allocate_tensors()
    return interpreter


def describe_tensor(detail: dict) -> dict:
    """A tensor's dtype and per-tensor quantisation as the manifest records them."""
    dtype = np.dtype(detail["dtype"]).name
    scale, zero_point = detail["quantization"]
    quantization = {"scale": float(scale), "zero_point": int(zero_point)} if scale else None
    return {"tensor_dtype": dtype, "quantization": quantization}


def default_threads(bundle) -> int:
    """The thread count: ``EDGEYOLO_THREADS``, else the target's ``threads`` option, where 0 means every core."""
    threads = bundle.manifest.get("backend", {}).get("options", {}).get("threads", 0)
    return int(os.environ.get("EDGEYOLO_THREADS", threads))


class Engine:
    """Runs a bundle's ``.tflite`` model; quantises int8 inputs and dequantises int8 outputs itself.

    The quantisation parameters are read from the model, not the manifest, so they cannot disagree.
    A LiteRT interpreter is not thread-safe (its tensors are shared state), so calls from several
    threads take turns on a lock: XNNPACK already spreads one call over the cores, and one
    interpreter per thread would multiply the arena memory that small devices lack.
    """

    def __init__(self, bundle, threads: int | None = None, **_):
        threads = default_threads(bundle) if threads is None else int(threads)
        threads = threads or os.cpu_count() or 1
        self.interpreter = open_interpreter(bundle.file("engine"), threads)
        self._lock = threading.Lock()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.info = {"backend": NAME, "version": litert_version(), "threads": threads, "delegate": "XNNPACK",
                     "input_dtype": np.dtype(self.input["dtype"]).name,
                     "output_dtype": np.dtype(self.output["dtype"]).name}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NHWC float32 0..1 in, the head output ``(B, N, 5+nc)`` float32 out."""
        expected = tuple(self.input["shape"])
        if batch.shape != expected:
            raise EdgeYoloError(f"this TFLite model takes input {list(expected)}, not {list(batch.shape)}")
        values = quantize(batch, self.input)
        with self._lock:
            self.interpreter.set_tensor(self.input["index"], values)
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self.output["index"])  # a copy, safe after the lock
        return dequantize(raw, self.output)


def quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """Float values → the tensor's integer type with its own scale and zero point (identity for float tensors)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / np.float32(scale)) + zero_point, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's integers → float32 with its own scale and zero point (float tensors pass through)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=False)
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
