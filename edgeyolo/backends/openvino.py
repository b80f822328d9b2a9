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
``Detector.stream`` uses ``Engine.async_queue``: a ring of infer requests on the model compiled
with ``STREAM_HINT``. The engine holds one compiled model at a time (see ``Engine``).
"""

from __future__ import annotations

import os
import queue
import re
import threading
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
# The stream's compiled model, for every precision. THROUGHPUT (here 2 streams x 1 thread)
# spends 15 ms of CPU per intel-cpu-int8 inference where LATENCY (1 stream x 2 threads, which
# synchronise at every layer) spends 19 ms; bf16 21 vs 27, fp32 34 vs 43 ms
# (benchmarks/bench_ov_hints.py, docs/runtime.md): two frames inferring side by side beat one
# frame on both cores once the host work overlaps them.
STREAM_HINT = "THROUGHPUT"
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

    The model is compiled on first need with the hint the caller needs: ``detect()`` the
    target's (LATENCY), ``stream`` ``STREAM_HINT``. Only one compiled model is held at a time:
    compiling the other drops it (with its pooled requests) and frees ~40 MB of RSS (a second
    compiled model with its streams' buffers: 240 MB instead of 198 MB peak for an
    ``intel-cpu-int8`` stream after one ``detect()``). A process that switches between
    ``detect()`` and ``stream`` pays a recompile (~0.5 s) at each switch.
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
        self._compiled: dict = {}  # hint -> (compiled model, its pool of idle requests); one entry at most
        self._compile_lock = threading.Lock()
        self._version = ov.__version__

    def _compiled_with_pool(self, hint: str):
        with self._compile_lock:
            if hint not in self._compiled:
                self._compiled.clear()  # drop the other hint's model first: never two in memory
                self._compiled[hint] = (self.core.compile_model(self.model, DEVICE, self._properties(hint)),
                                        queue.LifoQueue())
            return self._compiled[hint]

    def compiled_for(self, hint: str):
        """The model compiled with this performance hint (LATENCY or THROUGHPUT), compiled once."""
        return self._compiled_with_pool(hint)[0]

    @property
    def compiled(self):
        return self.compiled_for(self.hint)

    @property
    def info(self) -> dict:
        """The compiled model's facts: the one held now, else ``detect()``'s (compiled for this)."""
        held = next(iter(self._compiled.values()), None)
        compiled = held[0] if held else self.compiled
        return {
            "backend": NAME, "version": self._version, "device": DEVICE,
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")).split(".")[-1],
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")) or self.threads or os.cpu_count(),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        compiled, pool = self._compiled_with_pool(self.hint)
        try:
            request = pool.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            # share_inputs avoids one copy of the input; outputs are copied so a result outlives the next call.
            return request.infer({0: batch}, share_inputs=True, share_outputs=False)[0]
        finally:
            pool.put(request)  # a pool whose model was dropped meanwhile goes with it

    def async_queue(self, depth: int) -> "RequestRing":
        """A ring of ``depth`` infer requests on the model compiled with ``STREAM_HINT``.

        ``depth=1`` overlaps nothing (one frame at a time, as ``detect()``), so it runs on
        ``detect()``'s model: one single-threaded stream of the THROUGHPUT model would leave a core idle.
        """
        return RequestRing(self.compiled_for(STREAM_HINT if depth > 1 else self.hint), depth)


class RequestRing:
    """``depth`` infer requests used in turn: slot ``i`` takes frames ``i``, ``i + depth``, ...

    ``submit(batch, slot)`` starts the slot's request and returns at once; ``result()`` waits
    for it (the GIL released) and gives the request's own output tensor, not a copy (8.5 MB
    per 640x640 frame, ~1-2 ms to copy here). Input and output stay the caller's until it
    submits to that slot again: the batch is not copied either (``share_inputs``), so each
    slot needs its own input buffer. No callback runs in OpenVINO's threads, so no Python
    work competes with inference for the GIL. ``close()`` waits for every request started.
    """

    def __init__(self, compiled, depth: int):
        self.requests = [compiled.create_infer_request() for _ in range(depth)]
        self.started = [False] * depth
        self.inputs: list = [None] * depth  # each slot's batch, alive while its request may read it
        self.streams = int(compiled.get_property("NUM_STREAMS"))

    def submit(self, batch: np.ndarray, slot: int) -> "SlotResult":
        self.inputs[slot] = batch
        self.requests[slot].start_async({0: batch}, share_inputs=True)
        self.started[slot] = True
        return SlotResult(self, slot)

    def wait(self, slot: int) -> np.ndarray:
        request = self.requests[slot]
        request.wait()  # raises here, in the consumer's thread, when the inference failed
        self.started[slot] = False
        return request.get_output_tensor(0).data

    def close(self) -> None:
        for slot, request in enumerate(self.requests):
            if self.started[slot]:
                try:
                    request.wait()
                except Exception:  # noqa: BLE001 - closing after an error: the first error is the one to raise
                    pass
                self.started[slot] = False


class SlotResult:
    """One submitted frame: ``result()`` waits for its request and returns the output tensor's view."""

    def __init__(self, ring: RequestRing, slot: int):
        self.ring, self.slot = ring, slot

    def result(self) -> np.ndarray:
        return self.ring.wait(self.slot)

    def done(self) -> bool:
        return not self.ring.started[self.slot]
