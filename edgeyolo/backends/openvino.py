"""OpenVINO: Intel CPUs. FP32/FP16 IR from our ONNX; INT8 by NNCF post-training quantisation.

The bundle holds an OpenVINO IR (``model.xml`` + ``model.bin``). Target options (the
``[openvino]`` table, copied to the manifest) steer both the build and the engine:

- ``preset``, ``activations_range``, ``fast_bias_correction``: NNCF's INT8 settings (INT8 targets only);
- ``performance_hint`` (``LATENCY`` or ``THROUGHPUT``), ``threads`` (0 = OpenVINO's choice),
  ``inference_precision`` (``f32`` pins full precision where the CPU would otherwise run
  bf16, as on AVX512-BF16/AMX parts; ``bf16``/``f16`` ask for those; ``auto`` takes the
  fastest the CPU supports, bf16 > f32, resolved when the engine is compiled): the compiled
  model's properties. The precision actually used is in ``Engine.info``; the build records the
  one its own machine would use in the manifest (``backend.inference_precision``).

``detect()`` runs on the model compiled with the target's hint (LATENCY: one frame, every core).
``Detector.stream`` uses ``Engine.async_queue``: the same IR compiled a second time (lazily)
with the THROUGHPUT hint, several streams fed by OpenVINO's ``AsyncInferQueue``.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..errors import EdgeYoloError
from . import BuildResult, require

NAME = "openvino"
ENGINE_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
DEVICE = "CPU"
HINTS = ("LATENCY", "THROUGHPUT")
PRESETS = ("performance", "mixed")
# NNCF's ways to turn observed activations into INT8 ranges (RangeEstimatorParametersSet)
PRECISIONS = ("f32", "bf16", "f16", "auto")
UINT8_OPTION = "uint8_input"  # the engine takes the BGR uint8 letterbox (backends.image_input)
RANGES = ("histogram", "minmax", "mean_minmax", "median_minmax", "mean_no_outliers_minmax", "mean_quantile")


# --------------------------------------------------------------------------- build
def build(onnx_path: Path, target, out_dir: Path, calibration=None) -> BuildResult:
    ov = require("openvino", NAME)
    options = target.backend_options
    learned = target.precision == "int8" and getattr(calibration, "learned", False)
    if learned:  # QAT: OpenVINO reads the Q/DQ ONNX's learned scales as its FakeQuantize ranges, no NNCF pass
        qdq_path = out_dir / "qat.qdq.onnx"
        facts = calibration.write(onnx_path, qdq_path)
        model = ov.convert_model(str(qdq_path))
        qdq_path.unlink()
    else:
        model = ov.convert_model(str(onnx_path))
    info = {"version": ov.__version__,
            "inference_precision": resolve_precision(ov.Core(), options.get("inference_precision", "f32"))}
    if learned:
        info["quantization"] = facts
    elif target.precision == "int8":
        model, info["nncf_version"], info["ignored_nodes"] = quantize(model, target, calibration, options)
    image_input = {}
    if options.get(UINT8_OPTION, True):  # after quantising, which calibrates on floats
        model, image_input = take_uint8_image(model)
    # save_model compresses weights to FP16 unless told not to; only the fp16 target wants that.
    ov.save_model(model, str(out_dir / ENGINE_FILE), compress_to_fp16=target.precision == "fp16")
    return BuildResult(files={"engine": ENGINE_FILE, "weights": WEIGHTS_FILE}, info=info, input=image_input)


def take_uint8_image(model):
    """The model behind OpenVINO's PrePostProcessor: BGR uint8 NHWC in, RGB float NCHW / 255 inside.

    Returns (model, the manifest's ``input`` fields). See ``backends.image_input`` for why.
    """
    ov = require("openvino", NAME)
    from openvino.preprocess import ColorFormat, PrePostProcessor

    from .image_input import manifest_input

    shape = [d.get_length() if d.is_static else name
             for d, name in zip(model.inputs[0].get_partial_shape(), ("batch", "channels", "height", "width"))]
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
    return ppp.build(), manifest_input(shape)


def quantize(model, target, calibration, options: dict):
    """INT8 post-training quantisation with NNCF, calibrated on the set's letterboxed batches.

    Returns (quantized model, nncf version, how many nodes were kept out of INT8).
    """
    nncf = require("nncf", NAME)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    where = target.path or target.name
    preset = str(options.get("preset", "mixed")).lower()
    if preset not in PRESETS:
        raise EdgeYoloError(f"{where}: [openvino] preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    ranges = str(options.get("activations_range", "histogram")).lower()
    if ranges not in RANGES:
        raise EdgeYoloError(f"{where}: [openvino] activations_range must be one of {', '.join(RANGES)}, not {ranges!r}")
    fast_bias_correction = bool(options.get("fast_bias_correction", True))
    ignored = decode_node_names(model) if target.head == "decoded" else []
    kept = [str(name) for name in target.calibration.get("keep_float", [])]
    # a kept layer (block "model.8" or a node name) is every node named under it: NNCF leaves them in f32
    patterns = [rf"^/?{re.escape(name)}(/.*)?$" for name in kept]
    unmatched = [name for name, p in zip(kept, patterns) if not kept_matches(model, [p])]
    if unmatched:
        raise EdgeYoloError(f"keep_float: no layer named {', '.join(unmatched)} in this model")
    calibration.method = (f"nncf-ptq-{preset}-{ranges.replace('_', '-')}"
                          + ("-fast-bias-correction" if fast_bias_correction else "-bias-correction"))
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, ranges.upper()))
    quantized = nncf.quantize(
        model, nncf.Dataset(list(calibration.batches("NCHW", target.batch))),
        preset=getattr(nncf.QuantizationPreset, preset.upper()),
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(calibration),
        fast_bias_correction=fast_bias_correction,
        ignored_scope=(nncf.IgnoredScope(names=ignored, patterns=patterns, validate=False)
                       if ignored or patterns else None),
        advanced_parameters=advanced,
    )
    return quantized, nncf.__version__, len(ignored) + len(kept_matches(model, patterns))


def kept_matches(model, patterns: list[str]) -> list[str]:
    """The model's node names that the ``keep_float`` patterns leave out of INT8."""
    return [op.get_friendly_name() for op in model.get_ops()
            if any(re.match(p, op.get_friendly_name()) for p in patterns)]


def decode_node_names(model) -> list[str]:
    """Names of the detection head's decode: everything downstream of the first Reshape after a convolution.

    A YOLOv5 backbone and neck contain no Reshape, so this is exactly the per-level
    reshape, sigmoid, grid/anchor arithmetic and the final concat, whose outputs mix pixel
    coordinates (0..640) with probabilities (0..1) that one INT8 scale cannot serve.
    """
    starts = [op for op in model.get_ordered_ops() if op.get_type_name() == "Reshape" and _after_convolution(op)]
    names, stack = set(), list(starts)
    while stack:
        op = stack.pop()
        if op.get_type_name() in ("Result", "Constant") or op.get_friendly_name() in names:
            continue
        names.add(op.get_friendly_name())
        for output in op.outputs():
            stack.extend(target.get_node() for target in output.get_target_inputs())
    return sorted(names)


def _after_convolution(op) -> bool:
    producer = op.input_value(0).get_node()
    if producer.get_type_name() == "Add":  # the convolution's bias
        producer = producer.input_value(0).get_node()
    return producer.get_type_name() == "Convolution"


# --------------------------------------------------------------------------- engine
def resolve_precision(core, precision: str) -> str:
    """``auto`` → ``bf16`` where the CPU has bf16 units (AVX512-BF16, AMX), else ``f32``; others unchanged.

    bf16 keeps f32's exponent range, so the decoded head's pixel coordinates stay safe; f16 is
    left out of ``auto`` because OpenVINO's CPU plugin only runs it on AMX-FP16 parts.
    """
    precision = str(precision).lower()
    if precision != "auto":
        return precision
    core = core or require("openvino", NAME).Core()
    return "bf16" if "BF16" in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES") else "f32"


def compile_properties(options: dict, threads: int, performance_hint: str, core=None) -> dict:
    """The compiled model's properties from the target options and the caller's overrides."""
    hint = performance_hint.upper()
    if hint not in HINTS:
        raise EdgeYoloError(f"performance hint must be one of {', '.join(HINTS)}, not {performance_hint!r}")
    properties = {"PERFORMANCE_HINT": hint}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    if options.get("inference_precision"):
        properties["INFERENCE_PRECISION_HINT"] = resolve_precision(core, options["inference_precision"])
    return properties


class Engine:
    """The bundle's IR compiled for the CPU, safe to call from several threads.

    An infer request holds its own input and output tensors, so one shared request would mix
    up concurrent calls. Each call borrows a request from a pool (made on first need, so there
    are as many as threads ever ran at once) and returns it; one thread reuses one request.

    The model is compiled per performance hint on first need: ``detect()`` compiles the
    target's (LATENCY), ``stream`` the THROUGHPUT one. A process that only streams (a folder,
    a camera, ``bench --mode throughput``) so holds one compiled model, not two (~100 MB).
    """

    def __init__(self, bundle, threads: int | None = None, performance_hint: str | None = None, **_):
        ov = require("openvino", NAME)
        opts = bundle.manifest.get("backend", {}).get("options", {})
        threads = opts.get("threads", 0) if threads is None else threads
        self.threads = int(os.environ.get("EDGEYOLO_THREADS", threads))
        self.hint = (performance_hint or opts.get("performance_hint", "LATENCY")).upper()
        self.core = ov.Core()
        self.model = self.core.read_model(str(bundle.file("engine")), str(bundle.file("weights")))
        self._properties = lambda hint: compile_properties(opts, self.threads, hint, self.core)
        self._properties(self.hint)  # a bad hint or precision fails here, at load
        self._compiled, self._compile_lock = {}, threading.Lock()
        self._requests = queue.LifoQueue()
        self._version = ov.__version__

    def compiled_for(self, hint: str):
        """The model compiled with this performance hint (LATENCY or THROUGHPUT), compiled once."""
        with self._compile_lock:
            if hint not in self._compiled:
                self._compiled[hint] = self.core.compile_model(self.model, DEVICE, self._properties(hint))
            return self._compiled[hint]

    @property
    def compiled(self):
        return self.compiled_for(self.hint)

    @property
    def info(self) -> dict:
        """The compiled model's facts: the ``detect()`` one, or the stream's where only that was compiled."""
        compiled = self._compiled.get(self.hint) or self._compiled.get("THROUGHPUT") or self.compiled
        return {
            "backend": NAME, "version": self._version, "device": DEVICE,
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")).split(".")[-1],
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")) or self.threads or os.cpu_count(),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # share_inputs avoids one copy of the input; outputs are copied so a result outlives the next call.
            return request.infer({0: batch}, share_inputs=True, share_outputs=False)[0]
        finally:
            self._requests.put(request)

    def async_queue(self, depth: int) -> "AsyncQueue":
        """A queue of ``depth`` asynchronous requests on the THROUGHPUT-compiled model."""
        return AsyncQueue(self.compiled_for("THROUGHPUT"), depth)


class AsyncQueue:
    """OpenVINO's ``AsyncInferQueue`` behind futures: ``submit(batch)`` returns at once, the future gets the output.

    The request's callback (an OpenVINO thread) only copies the output out; the caller's thread
    is free for other frames' host work meanwhile. ``close()`` waits for every request, so no
    callback runs after it returns.
    """

    def __init__(self, compiled, depth: int):
        ov = require("openvino", NAME)
        self.queue = ov.AsyncInferQueue(compiled, depth)
        self.queue.set_callback(self._done)
        self.streams = int(compiled.get_property("NUM_STREAMS"))

    @staticmethod
    def _done(request, future: Future) -> None:
        try:
            future.set_result(request.get_output_tensor(0).data.copy())
        except Exception as exc:  # surfaces in the consumer's future.result(), not in OpenVINO's thread
            future.set_exception(exc)

    def submit(self, batch: np.ndarray) -> Future:
        future: Future = Future()
        # the input is copied into the request's own tensor: the caller may reuse its buffer at once
        self.queue.start_async({0: batch}, future, share_inputs=False)
        return future

    def close(self) -> None:
        self.queue.wait_all()
