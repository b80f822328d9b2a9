"""Explicit INT8: our ONNX → a Q/DQ ONNX calibrated on the user's images (ONNX Runtime's quantiser).

The Q/DQ ONNX is the portable INT8 artefact. ONNX Runtime runs it on a CPU (``cpu-int8``)
and TensorRT compiles it on the device (``cuda-int8``, ``jetson-int8``); either is measured on
any machine before a device is flashed (a TensorRT bundle's ONNX on ONNX Runtime).

The scheme; the defaults in ``targets/*-int8.toml`` were chosen on held-out images of
coco-tune-1193 and coco128 (``docs/int8.md``, ``benchmarks/bench_int8.py``):

- weights int8, symmetric, per output channel; activations ``symmetric`` (zero point 0, the only
  form TensorRT takes), stored as uint8 around 128 for ONNX Runtime's x86 integer kernels
  (``backends/trt/encoding.py`` turns that into int8 exactly), or ``asymmetric`` (``cpu-int8``:
  uint8 with each tensor's own zero point, all 256 steps over a SiLU output's [-0.28, max]);
- ``placement``: ``onnxruntime`` puts Q/DQ on every quantisable op's inputs and outputs (ONNX
  Runtime fuses an integer convolution only between a DQ and a Q); ``tensorrt`` drops the pairs
  between a convolution and its SiLU (TensorRT fuses Conv+BN+SiLU into one INT8 layer);
- activation ranges from the calibration images by ``method``: ``mean-minmax`` (each image's
  min/max, averaged), ``minmax``, ``entropy`` or ``percentile``; a convolution feeding a SiLU
  keeps negatives only down to ``-max(positive range, 6)``: SiLU maps anything below that to ~0;
- the head stays in float: the detection convolutions' outputs and everything after them
  (reshape, transpose, sigmoid, concat) are never quantised. One int8 scale over box and class
  values is the known trap;
- ``bias_correction``: each convolution's int32 bias loses the mean error its own INT8 (rounded
  weights, rounded and clipped input) adds to its output channels, measured on the FP32
  activations of the calibration images (``bias_shifts``); the Q/DQ placement is unchanged;
- ``refit`` (the default of the Q/DQ targets, instead of bias correction): each convolution's float
  weights and bias re-solved, in execution order, to reproduce the FP32 output from the INT8 inputs
  the graph really gives it (``refit_weights``; ridge ``refit_ridge`` toward the FP32 weights);
- ``keep_float``: blocks (``model.1``) left in float with no Q/DQ around them, inputs included
  (FP16 on TensorRT), ranked by ``edgeyolo sensitivity``; ``float_from_stride``: every layer at
  that output stride or coarser left in float (0: none).

Ranges are calibrated once (``calibrate_ranges``) and any placement is written from them
(``write_qdq``): that is what makes the per-layer sensitivity sweep cheap.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeYoloError
from .targets import ACTIVATION_SCHEMES, PLACEMENTS, REFIT_WEIGHTINGS

METHODS = ("mean-minmax", "minmax", "entropy", "percentile")
DEFAULT_METHOD = "mean-minmax"
DEFAULT_PERCENTILE = 99.99
DEFAULT_FLOAT_STRIDE = 32
SILU_NEGATIVE_FLOOR = 6.0  # SiLU(-6) = -0.015: below that the input's exact value no longer matters
MAX_IMAGES_PER_PASS = 8  # histogram methods: images whose every activation is in memory at once (~0.3 GB each)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
ACTIVATION_FACTS = {"symmetric": "int8 symmetric per-tensor (stored uint8, zero point 128)",
                    "asymmetric": "uint8 asymmetric per-tensor (each tensor's own zero point; not for TensorRT)"}


@dataclass(frozen=True)
class QuantizeSettings:
    """How INT8 is made; read from a target's ``[calibration]`` table."""

    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    float_from_stride: int = DEFAULT_FLOAT_STRIDE  # layers at this output stride or coarser stay float; 0: none
    keep_float: tuple[str, ...] = ()  # layers (blocks such as "model.8", or node names) left in float
    bias_correction: bool = False  # take each convolution's own INT8 mean error out of its bias
    refit: bool = False  # re-fit each convolution's weights for its quantised inputs (``refit_weights``)
    refit_ridge: float = 1.0  # how strongly the re-fit stays near the FP32 weights
    refit_weighting: str = "none"  # "activation": fit each output's error as it is after its activation
    activations: str = "symmetric"  # "asymmetric": uint8 with each tensor's own zero point (not TensorRT)
    placement: str = "onnxruntime"  # "tensorrt": no Q/DQ between a convolution and its SiLU

    def __post_init__(self):
        if self.method not in METHODS:
            raise EdgeYoloError(f"calibration method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not isinstance(self.bias_correction, bool):
            raise EdgeYoloError(f"bias_correction must be true or false, not {self.bias_correction!r}")
        if not isinstance(self.refit, bool):
            raise EdgeYoloError(f"refit must be true or false, not {self.refit!r}")
        if not (isinstance(self.refit_ridge, (int, float)) and 0 < self.refit_ridge <= 10):
            raise EdgeYoloError(f"refit_ridge must be a number in (0, 10], not {self.refit_ridge!r}")
        if self.refit_weighting not in REFIT_WEIGHTINGS:
            raise EdgeYoloError(f"refit_weighting must be one of {', '.join(REFIT_WEIGHTINGS)}, "
                                f"not {self.refit_weighting!r}")
        if self.activations not in ACTIVATION_SCHEMES:
            raise EdgeYoloError(f"activations must be one of {', '.join(ACTIVATION_SCHEMES)}, "
                                f"not {self.activations!r}")
        if self.placement not in PLACEMENTS:
            raise EdgeYoloError(f"placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}")
        if not 90.0 <= self.percentile < 100.0:
            raise EdgeYoloError(f"calibration percentile must be in [90, 100), not {self.percentile}")
        if self.float_from_stride < 0:
            raise EdgeYoloError(f"float_from_stride must be 0 (quantise every stage) or a stride, "
                                f"not {self.float_from_stride}")
        if isinstance(self.keep_float, str) or not all(isinstance(x, str) and x for x in self.keep_float):
            raise EdgeYoloError(f"keep_float must be a list of layer names (e.g. [\"model.8\"]), not {self.keep_float!r}")

    @classmethod
    def from_target(cls, target) -> "QuantizeSettings":
        calib = target.calibration
        return cls(method=str(calib.get("method", DEFAULT_METHOD)),
                   percentile=float(calib.get("percentile", DEFAULT_PERCENTILE)),
                   float_from_stride=int(calib.get("float_from_stride", DEFAULT_FLOAT_STRIDE)),
                   keep_float=_as_names(calib.get("keep_float", ())),
                   bias_correction=calib.get("bias_correction", False),
                   refit=calib.get("refit", False), refit_ridge=calib.get("refit_ridge", 1.0),
                   refit_weighting=calib.get("refit_weighting", "none"),
                   activations=calib.get("activations", "symmetric"),
                   placement=calib.get("placement", "onnxruntime"))

    def describe(self) -> str:
        method = f"percentile {self.percentile:g}" if self.method == "percentile" else self.method
        if self.activations == "asymmetric":
            method += ", asymmetric activations"
        if self.placement == "tensorrt":
            method += ", Q/DQ on layer inputs only"
        if self.refit:
            weighted = ", activation-weighted" if self.refit_weighting == "activation" else ""
            return method + f", least-squares weight re-fit (ridge {self.refit_ridge:g}{weighted})"
        return method + (", bias correction" if self.bias_correction else "")


def _as_names(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


# --------------------------------------------------------------------------- what stays float
def layer_of(node_name: str) -> str:
    """The block a node belongs to: ``/model.8/cv1/conv/Conv`` → ``model.8`` (the unit sensitivity ranks)."""
    parts = node_name.strip("/").split("/")
    return parts[0] if len(parts) > 1 else node_name


def layers(model) -> list[str]:
    """The model's blocks in graph order (``model.0`` ... ``model.24``)."""
    seen = {}
    for node in model.graph.node:
        if node.op_type != "Constant":
            seen.setdefault(layer_of(node.name), None)
    return list(seen)


def kept_nodes(model, keep_float) -> list[str]:
    """Node names inside the ``keep_float`` layers (a block name or an exact node name each)."""
    if not keep_float:
        return []
    wanted = set(keep_float)
    names = [n.name for n in model.graph.node]
    unknown = wanted - {layer_of(n) for n in names} - set(names)
    if unknown:
        raise EdgeYoloError(f"keep_float: no layer named {', '.join(sorted(unknown))} in this model "
                            f"(layers: {', '.join(layers(model))})")
    return [n for n in names if n in wanted or layer_of(n) in wanted]


@dataclass(frozen=True)
class HeadSplit:
    """Where the quantised body ends: the detection convolutions and the float decode after them."""

    convs: tuple[str, ...]  # node names: int8 inputs, float outputs
    decode: tuple[str, ...]  # node names between those convolutions and the graph outputs (never quantised)
    float_tensors: tuple[str, ...]  # the convolutions' outputs, kept float


def split_head(model) -> HeadSplit:
    """Walk back from the graph outputs to the nearest convolutions; what lies between is the head's decode."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    convs, decode, seen = {}, {}, set()
    stack = [o.name for o in graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.op_type == "Conv":
            convs[node.name] = node
            continue
        decode[node.name] = node
        stack.extend(node.input)
    if not convs:
        raise EdgeYoloError("cannot find the detection convolutions in this ONNX graph (no Conv before its outputs)")
    return HeadSplit(convs=tuple(sorted(convs)), decode=tuple(sorted(decode)),
                     float_tensors=tuple(sorted(n.output[0] for n in convs.values())))


def coarse_nodes(model, min_stride: int) -> list[str]:
    """Nodes whose output feature map is at ``min_stride`` or coarser (shapes inferred from the static input)."""
    if min_stride <= 0:
        return []
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    height = inferred.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    if not height:
        raise EdgeYoloError("float_from_stride needs a fixed input size to know each layer's stride")
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    coarse = []
    for node in inferred.graph.node:
        shape = dims.get(node.output[0]) if node.output else None
        if shape and len(shape) == 4 and shape[2] and height // shape[2] >= min_stride:
            coarse.append(node.name)
    return coarse


# --------------------------------------------------------------------------- quantise
def quantize_onnx(src: str | Path, dst: str | Path, calibration, settings: QuantizeSettings = QuantizeSettings()) -> dict:
    """Write the Q/DQ version of ``src`` to ``dst``, calibrated on ``calibration`` (a ``CalibrationSet``).

    Returns the facts for the manifest (tool, method, what was quantised, which layers were kept float).
    """
    import onnx

    from .backends import require

    ort = require("onnxruntime", "onnxruntime")
    src, dst = Path(src), Path(dst)
    if getattr(calibration, "learned", False):  # a QAT checkpoint's learned ranges (optimize/qat/learned.py)
        return calibration.write(src, dst)
    calibration.method = settings.describe()
    model = onnx.load(str(src))
    kept = kept_nodes(model, settings.keep_float)
    ranges = calibrate_ranges(src, calibration, settings)
    qdq, removed = write_qdq(src, ranges, settings, extra_float=kept)
    refit = {}
    if settings.refit:  # the re-fit solves each bias too: bias correction is part of it
        qdq, removed, refit = refit_weights(src, qdq, ranges, settings, kept, calibration)
        corrected = 0
    else:
        corrected = correct_biases(qdq, src, calibration) if settings.bias_correction else 0
    onnx.checker.check_model(qdq)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(qdq, str(tmp))
    tmp.replace(dst)
    summary = summarize_qdq(qdq)
    return {
        "tool": f"onnxruntime.quantization {ort.__version__}",
        "format": "QDQ",
        "method": settings.method,
        **({"percentile": settings.percentile} if settings.method == "percentile" else {}),
        "bias_corrected_convs": corrected,
        **({"refit": refit} if refit else {}),
        "weights": "int8 symmetric per-channel",
        "activations": ACTIVATION_FACTS[settings.activations],
        "images": len(calibration),
        "float_from_stride": settings.float_from_stride,
        "keep_float": list(settings.keep_float),
        "kept_float_nodes": len(kept),
        "silu_ranges_clipped": ranges.clipped,
        "quantized_nodes": len(summary["quantized"]),
        "float_nodes": sorted(summary["float"]),
        "float_outputs_of": list(split_head(model).convs),
        "removed_qdq_pairs": removed,
    }


def _tag(qdq, model, settings: QuantizeSettings) -> None:
    """The source's metadata plus one line saying how this graph was quantised."""
    del qdq.metadata_props[:]
    qdq.metadata_props.extend(model.metadata_props)
    kept = f", float: {', '.join(settings.keep_float)}" if settings.keep_float else ""
    qdq.metadata_props.add(key="quantization", value=f"qdq int8 per-channel weights, {settings.describe()}{kept}")


@dataclass
class Ranges:
    """Calibrated activation ranges (ONNX Runtime's ``TensorsData``), reusable for many Q/DQ placements."""

    data: object
    clipped: int  # SiLU inputs whose negative range was clipped


def calibrate_ranges(src: Path, calibration, settings: QuantizeSettings) -> Ranges:
    """Run the calibration images through ``src`` once and turn what was seen into activation ranges."""
    import onnx

    from .backends import require

    q = require("onnxruntime.quantization", "onnxruntime")
    model = onnx.load(str(src))
    op_types = sorted({n.op_type for n in model.graph.node} - {"Constant"})
    with tempfile.TemporaryDirectory(prefix=f"edgeyolo-calibrate-{os.getpid()}-") as work, _quiet_quantizer():
        input_name = model.graph.input[0].name
        ranges = calibrate(q, Path(src), Path(work), calibration, input_name, settings, op_types)
    # the input is letterboxed pixels / 255: its range is known, not estimated
    ranges.data[input_name] = q.TensorData(lowest=np.float32(0.0), highest=np.float32(1.0))
    clipped = clip_silu_inputs(q, ranges, model)
    return Ranges(data=ranges, clipped=clipped)


def write_qdq(src: Path, ranges: Ranges, settings: QuantizeSettings, extra_float=()):
    """The Q/DQ model of ``src`` with ``ranges``: head decode, coarse stages and ``extra_float`` nodes left float.

    Returns (model, how many Q/DQ pairs were removed: on the head convolutions' outputs, and inside
    each SiLU where ``placement`` is ``tensorrt``).
    """
    import onnx

    from .backends import require

    q = require("onnxruntime.quantization", "onnxruntime")
    model = onnx.load(str(src))
    head = split_head(model)
    excluded = sorted(set(head.decode) | set(coarse_nodes(model, settings.float_from_stride)) | set(extra_float))
    op_types = sorted({n.op_type for n in model.graph.node} - {"Constant"})
    extra = {"ActivationSymmetric": settings.activations == "symmetric", "WeightSymmetric": True}
    with tempfile.TemporaryDirectory(prefix=f"edgeyolo-quantize-{os.getpid()}-") as work, _quiet_quantizer():
        quantizer = q.QDQQuantizer(
            _load_with_shapes(src), True, False, q.QuantType.QInt8, q.QuantType.QUInt8, ranges.data, [], excluded,
            op_types, extra,
        )
        quantizer.quantize_model()
        quantizer.model.save_model_to_file(str(Path(work) / "qdq.onnx"))  # topologically sorted on the way
        qdq = onnx.load(str(Path(work) / "qdq.onnx"))
    removed = remove_qdq_on(qdq, head.float_tensors)
    if settings.placement == "tensorrt":
        removed += remove_qdq_on(qdq, inside_silus(model))
    read_float_inputs(qdq, extra_float)
    _tag(qdq, model, settings)
    return qdq, removed


def refit_weights(src: Path, qdq, ranges: Ranges, settings: QuantizeSettings, kept, calibration):
    """The Q/DQ graph written again from weights re-fit for their quantised inputs; (model, removed, facts).

    Each convolution, in execution order, is solved (ridge least squares, toward its FP32 weights)
    to reproduce the FP32 graph's output from the inputs the Q/DQ graph really gives it
    (``optimize/qat/refit.py``, torch). The placement and ranges stay; the weights change.
    """
    try:
        from .optimize.qat.refit import refit_onnx
    except ImportError as exc:
        raise EdgeYoloError(f"the weight re-fit ([calibration] refit = true) needs torch ({exc.name} is missing): "
                            "pip install 'edgeyolo[export]', or set refit = false") from exc
    key = _refit_key(src, qdq, calibration, settings)
    with tempfile.TemporaryDirectory(prefix=f"edgeyolo-refit-{os.getpid()}-") as work:
        refit_src = Path(work) / "refit.onnx"
        cached = _RECENT_REFITS.get(key) if key is not None else None
        if cached is not None:  # e.g. cpu-int8 and jetson-int8 built from one model in one process
            facts, data = cached
            refit_src.write_bytes(data)
        else:
            facts = {**refit_onnx(src, qdq, calibration, refit_src, ridge=settings.refit_ridge,
                                  weighting=settings.refit_weighting).describe(),
                     "ridge": settings.refit_ridge, "weighting": settings.refit_weighting}
            if key is not None:
                _remember_refit(key, facts, refit_src.read_bytes())
        qdq, removed = write_qdq(refit_src, ranges, settings, extra_float=kept)
    return qdq, removed, dict(facts)


_RECENT_REFITS: dict = {}  # this process's recent re-fits, oldest first: {key: (facts, re-fit float ONNX bytes)}
REFIT_CACHE_BYTES = 256 << 20  # yolov5n's re-fit ONNX is ~8 MB, yolov5x's ~350 MB (kept alone)
_REFIT_LOCK = threading.Lock()


def _remember_refit(key: str, facts: dict, data: bytes) -> None:
    with _REFIT_LOCK:  # builds may run in threads
        _RECENT_REFITS.pop(key, None)
        _RECENT_REFITS[key] = (facts, data)
        while len(_RECENT_REFITS) > 1 and sum(len(d) for _, d in _RECENT_REFITS.values()) > REFIT_CACHE_BYTES:
            del _RECENT_REFITS[next(iter(_RECENT_REFITS))]


def _refit_key(src: Path, qdq, calibration, settings: QuantizeSettings) -> str | None:
    """Everything a re-fit depends on: the float graph, the Q/DQ graph, the images, the ridge (None: unknown)."""
    import hashlib

    if not hasattr(calibration, "describe"):
        return None
    images = {k: v for k, v in calibration.describe().items() if k != "method"}  # hashes, count, letterbox
    import onnx

    digest = hashlib.sha256(onnx.load(str(src)).graph.SerializeToString())  # the graphs, not the metadata
    digest.update(qdq.graph.SerializeToString())  # (which names the target)
    digest.update(json.dumps([images, settings.refit_ridge, settings.refit_weighting], sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()


def correct_biases(qdq, src: Path, calibration) -> int:
    """Bias correction of ``qdq`` in place (``bias_shifts`` then ``apply_bias_shifts``); how many convs changed."""
    return apply_bias_shifts(qdq, bias_shifts(qdq, src, calibration))


def apply_bias_shifts(qdq, shifts: dict) -> int:
    """Subtract ``shifts`` (int32 bias initializer name → steps) from the biases of ``qdq`` that have them.

    A layer's shift depends only on its own weights and input Q/DQ, so shifts measured on the
    all-INT8 graph hold for any placement that quantises that layer the same way (sensitivity).
    """
    from onnx import numpy_helper

    changed = 0
    for bias in qdq.graph.initializer:
        if bias.name in shifts:
            values = numpy_helper.to_array(bias).astype(np.int64) - shifts[bias.name]
            bias.CopyFrom(numpy_helper.from_array(np.clip(values, -2**31, 2**31 - 1).astype(np.int32), bias.name))
            changed += 1
    return changed


def bias_shifts(qdq, src: Path, calibration) -> dict:
    """Bias correction: the int32 steps to take out of each INT8 convolution's bias (its own mean error).

    Rounding a convolution's weights (per channel) and its input (the Q/DQ before it) moves the
    mean of its output channels, and the layers after it read that shift as signal. Measured on
    the FP32 activations of the calibration images (so each layer is corrected for its own error
    only, not for what earlier layers did, as NNCF's fast bias correction does): the per-channel
    means of the input before and after its Q/DQ give, through the float and the INT8 weights,
    the output's mean shift (zero padding at the borders neglected), to be subtracted from the
    int32 bias in its own steps. Returns {bias initializer name: steps}.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    reference = onnx.load(str(src))
    float_weights = {i.name: i for i in reference.graph.initializer}
    float_convs = {n.name: n for n in reference.graph.node if n.op_type == "Conv"}
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {out: node for node in qdq.graph.node for out in node.output}
    array = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    plan = []  # (conv, float tensor, input scale, input zero point, its integer range)
    for node in qdq.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.name not in float_convs:
            continue
        x_dq, w_dq, b_dq = (producer.get(name) for name in node.input[:3])
        x_q = producer.get(x_dq.input[0]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if x_q is None or x_q.op_type != "QuantizeLinear" or any(
                dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits for dq in (w_dq, b_dq)):
            continue
        zero = array(x_q.input[2])
        bounds = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
        plan.append((node, x_q.input[0], float(array(x_q.input[1])), int(zero), bounds))
    if not plan:
        return {}
    input_name = reference.graph.input[0].name
    tensors = sorted({t for _, t, _, _, _ in plan} - {input_name})
    session = ort.InferenceSession(onnx_with_outputs(reference, tensors).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    keys = {(t, scale, zero, bounds) for _, t, scale, zero, bounds in plan}
    sums: dict = {}  # (tensor, scale, zero point, range) -> per-channel [float mean, mean after Q/DQ], summed over images
    for batch in calibration.batches("NCHW", 1):
        values = dict(zip(tensors, session.run(tensors, {input_name: batch})), **{input_name: batch})
        for key in keys:
            tensor, scale, zero, (low, high) = key
            x = values[tensor].astype(np.float64)
            rounded = (np.clip(np.rint(x / scale) + zero, low, high) - zero) * scale
            found = [x.mean(axis=(0, 2, 3)), rounded.mean(axis=(0, 2, 3))]
            sums[key] = [a + b for a, b in zip(sums[key], found)] if key in sums else found
    shifts = {}
    for conv, tensor, scale, zero, bounds in plan:
        float_mean, rounded_mean = (v / len(calibration) for v in sums[(tensor, scale, zero, bounds)])
        weight = numpy_helper.to_array(float_weights[float_convs[conv.name].input[1]]).astype(np.float64)
        w_dq, b_dq = producer[conv.input[1]], producer[conv.input[2]]
        w_scale = array(w_dq.input[1]).astype(np.float64).reshape(-1, 1, 1, 1)
        w_zero = array(w_dq.input[2]).astype(np.float64).reshape(-1, 1, 1, 1) if len(w_dq.input) > 2 else 0.0
        rounded_weight = (array(w_dq.input[0]).astype(np.float64) - w_zero) * w_scale
        shift = (np.einsum("oikl,i->o", rounded_weight, rounded_mean)
                 - np.einsum("oikl,i->o", weight, float_mean))
        shifts[b_dq.input[0]] = np.rint(shift / array(b_dq.input[1])).astype(np.int64)
    return shifts


def onnx_with_outputs(model, names):
    """A copy of ``model`` that also returns the tensors ``names`` (float)."""
    from onnx import TensorProto, helper

    probe = type(model)()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in existing)
    return probe


def calibrate(q, src: Path, work: Path, calibration, input_name: str, settings: QuantizeSettings, op_types):
    """Activation ranges (ONNX Runtime's ``TensorsData``) over the calibration set, by ``settings.method``."""
    methods = {"mean-minmax": q.CalibrationMethod.MinMax, "minmax": q.CalibrationMethod.MinMax,
               "entropy": q.CalibrationMethod.Entropy, "percentile": q.CalibrationMethod.Percentile}
    options = {"moving_average": settings.method == "mean-minmax"}
    if settings.method == "percentile":
        options.update(percentile=settings.percentile, symmetric=True)
    calibrator = q.create_calibrator(src, op_types, augmented_model_path=str(work / "augmented.onnx"),
                                     calibrate_method=methods[settings.method], extra_options=options)
    reader = CalibrationReader(calibration, input_name)
    if settings.method in ("minmax", "mean-minmax"):
        # one pass: only per-image (min, max) pairs are kept, and a mean over several passes would be a running one
        calibrator.collect_data(reader)
    else:  # histograms: every activation of a window of images is held at once
        for start in range(0, len(reader), reader.pass_size):
            reader.set_range(start, start + reader.pass_size)
            calibrator.collect_data(reader)
    return calibrator.compute_data()


def silu_convs(model) -> list:
    """(convolution, its sigmoid) for each convolution whose output only feeds a SiLU (YOLOv5 exports
    ``x * sigmoid(x)``: the output is read by a Sigmoid and a Mul)."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        users = readers.get(node.output[0], []) if node.op_type == "Conv" and node.output else []
        if {n.op_type for n in users} == {"Sigmoid", "Mul"}:
            pairs.append((node, next(n for n in users if n.op_type == "Sigmoid")))
    return pairs


def inside_silus(model) -> list[str]:
    """The tensors between a convolution and its SiLU's output: the convolution's output and the sigmoid's."""
    return [tensor for conv, sigmoid in silu_convs(model) for tensor in (conv.output[0], sigmoid.output[0])]


def clip_silu_inputs(q, ranges, model, floor: float | None = None) -> int:
    """A convolution feeding a SiLU: keep negatives only down to ``-max(its positive range, floor)``."""
    floor = SILU_NEGATIVE_FLOOR if floor is None else floor
    clipped = 0
    for conv, _ in silu_convs(model):
        out = conv.output[0]
        if out not in ranges.data:
            continue
        low, high = (np.asarray(v, dtype=np.float32) for v in ranges.data[out].range_value)
        bound = np.maximum(high, np.float32(floor))
        if np.any(low < -bound):
            ranges.data[out] = q.TensorData(lowest=np.maximum(low, -bound).astype(np.float32),
                                            highest=high.astype(np.float32))
            clipped += 1
    return clipped


def _load_with_shapes(path: Path):
    """The model with shape information, as ONNX Runtime's quantiser expects it."""
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    return load_model_with_shape_infer(Path(path))


class CalibrationReader:
    """Feeds a ``CalibrationSet`` to ONNX Runtime's calibrators, one image per run, a window of images per pass."""

    def __init__(self, calibration, input_name: str):
        self.calibration = calibration
        self.input_name = input_name
        self.pass_size = largest_divisor(len(calibration), MAX_IMAGES_PER_PASS)
        self._batches, self._position = None, 0
        self.set_range(0, len(calibration))

    def __len__(self) -> int:
        return len(self.calibration)

    def set_range(self, start_index: int, end_index: int) -> None:
        if self._batches is None or start_index != self._position:
            self._batches = itertools.islice(self.calibration.batches("NCHW", 1), start_index, None)
            self._position = start_index
        self._end = end_index

    def get_next(self):
        if self._position >= self._end:
            return None
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._position += 1
        return {self.input_name: batch}


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (windows of equal size)."""
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


# --------------------------------------------------------------------------- graph edits and facts
def remove_qdq_on(model, tensors) -> int:
    """Drop the QuantizeLinear → DequantizeLinear pairs on ``tensors``, rewiring readers to the float tensor."""
    graph = model.graph
    wanted = set(tensors)
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in wanted]
    drop, rewire = [], {}
    for qnode in quantizers:
        dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == qnode.output[0]]
        for dq in dqs:
            rewire[dq.output[0]] = qnode.input[0]
        drop.extend([qnode, *dqs])
    for output in graph.output:
        if output.name in rewire:
            raise EdgeYoloError(f"cannot un-quantize graph output {output.name}")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    for node in drop:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(quantizers)


def read_float_inputs(model, nodes) -> int:
    """Rewire ``nodes`` to read the float tensor instead of its Q→DQ copy: a kept layer sees no INT8 rounding.

    The Q/DQ pair stays for the other readers (an INT8 neighbour); pairs nobody reads any more are dropped.
    Returns how many inputs were rewired.
    """
    graph = model.graph
    wanted = set(nodes)
    producer = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for node in graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            qnode = producer.get(dq.input[0])
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                node.input[i] = qnode.input[0]
                rewired += 1
    _drop_unread_qdq(model)
    return rewired


def _drop_unread_qdq(model) -> None:
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type in QDQ_OPS and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    _drop_unused_initializers(graph)


def summarize_qdq(model) -> dict:
    """Which compute nodes read dequantized inputs (``quantized``) and which read only float (``float``)."""
    graph = model.graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    initializers = {i.name for i in graph.initializer}
    quantized, floating = [], []
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.op_type == "Constant":
            continue
        data_inputs = [x for x in node.input if x and x not in initializers]
        (quantized if any(x in dq_outputs for x in data_inputs) else floating).append(node.name)
    return {"quantized": quantized, "float": floating}


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantiser logs advice on the root logger and prints progress; keep the CLI's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _drop_unused_initializers(graph) -> None:
    """Remove the initializers no node reads any more (scales and zero points of removed Q/DQ pairs)."""
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
