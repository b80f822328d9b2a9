"""The Q/DQ ONNX placed and calibrated by NNCF (its ONNX backend), in the scheme TensorRT compiles.

Why NNCF rather than ONNX Runtime's quantiser for the explicit-INT8 graph: NNCF quantises only
the inputs of the operations that run in INT8 (a convolution's input after the previous SiLU, a
residual add's inputs, a concatenation's inputs), so a Conv + SiLU stays one fused float-output
group as TensorRT builds it, and it applies **bias correction**: each convolution's bias is
shifted by the mean error its INT8 version makes on the calibration images. OpenVINO's INT8
(same tool) loses 5x less accuracy than our ONNX Runtime recipe on YOLOv5n (``docs/int8.md``).

The scheme is forced to what TensorRT takes: weights int8 symmetric per output channel (full
8 bits, no overflow fix), activations int8 symmetric (signed everywhere, zero point 0), stored
afterwards as uint8 around 128 for ONNX Runtime's x86 integer kernels like the rest of
``edgeyolo.quantize`` (``to_uint8_activations``, exact).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from .errors import EdgeYoloError

# our method names → NNCF's RangeEstimatorParametersSet members
RANGES = {"minmax": "MINMAX", "mean-minmax": "MEAN_MINMAX", "histogram": "HISTOGRAM",
          "median-minmax": "MEDIAN_MINMAX", "mean-no-outliers-minmax": "MEAN_NO_OUTLIERS_MINMAX",
          "mean-quantile": "MEAN_QUANTILE"}


def nncf_quantize_onnx(src: Path, calibration, method: str, excluded, bias_correction: str = "fast"):
    """The NNCF-quantised ``onnx.ModelProto`` of ``src``; ``excluded`` node names get no input quantizers.

    ``bias_correction``: ``fast`` (NNCF's default), ``full`` (slower, layer-wise), or ``none``.
    """
    import onnx

    from .backends import require

    nncf = require("nncf", "onnxruntime")
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if method not in RANGES:
        raise EdgeYoloError(f"calibration method for quantizer = \"nncf\" must be one of {', '.join(RANGES)}, "
                            f"not {method!r}")
    if bias_correction not in ("fast", "full", "none"):
        raise EdgeYoloError(f"bias_correction must be fast, full or none, not {bias_correction!r}")
    model = onnx.load(str(src))
    input_name = model.graph.input[0].name
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE,  # TensorRT's int8 kernels take the full 8 bits
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, RANGES[method]),
        disable_bias_correction=bias_correction == "none")
    with _quiet():
        quantized = nncf.quantize(
            model, nncf.Dataset([{input_name: batch} for batch in calibration.batches("NCHW", 1)]),
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(calibration),
            fast_bias_correction=bias_correction != "full",
            ignored_scope=nncf.IgnoredScope(names=list(excluded), validate=False) if excluded else None,
            advanced_parameters=advanced)
    to_uint8_activations(quantized)
    return quantized


def to_uint8_activations(model) -> int:
    """int8 zero point 0 → uint8 zero point 128 on the activations' Q/DQ pairs (exact; weights stay int8).

    ``clamp(round(x/s), -128, 127) + 128 == clamp(round(x/s) + 128, 0, 255)``: the inverse of
    ``backends/trt/encoding.shift_uint8_zero_points``. NNCF gives a non-negative tensor (the input
    image) an unsigned quantizer, uint8 with zero point 0, which TensorRT cannot take: it becomes
    signed with the same range, scale ``s * 255 / 127`` (one bit less, as our other quantiser has it).
    Returns how many Q/DQ nodes changed.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    renamed: dict[str, str] = {}
    widened: set[str] = set()
    changed = 0
    for node in graph.node:
        activation = (node.op_type == "QuantizeLinear" and node.input[0] not in inits) or (
            node.op_type == "DequantizeLinear" and node.input[0] in quantized)
        if not activation or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zero = inits[node.input[2]]
        values = numpy_helper.to_array(zero)
        if zero.data_type not in (TensorProto.INT8, TensorProto.UINT8) or np.any(values != 0):
            raise EdgeYoloError(f"{node.name}: NNCF wrote an asymmetric activation quantizer; TensorRT needs symmetric")
        if zero.data_type == TensorProto.UINT8 and node.input[1] not in widened:  # [0, 255 s] → [-255 s, 255 s]
            scale = inits[node.input[1]]
            wider = numpy_helper.to_array(scale).astype(np.float32) * np.float32(255.0 / 127.0)
            scale.CopyFrom(numpy_helper.from_array(wider.astype(np.float32), scale.name))
            widened.add(node.input[1])
        name = node.input[2]
        if name not in renamed:
            renamed[name] = f"{name}_uint8"
            graph.initializer.append(numpy_helper.from_array(np.full(values.shape, 128, np.uint8), renamed[name]))
        node.input[2] = renamed[name]
        changed += 1
    # the quantized tensors' recorded types were int8: let ONNX infer them again
    stale = [v for v in graph.value_info if v.name in quantized]
    for value in stale:
        graph.value_info.remove(value)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return changed


@contextlib.contextmanager
def _quiet():
    """NNCF logs every ignored node and draws progress bars; keep the CLI's output to our own lines."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_log.setLevel(level)


# --------------------------------------------------------------------------- ONNX Runtime's integer kernels
def quantize_conv_outputs(model, calibration, floor: float) -> int:
    """Add Q/DQ on the outputs of the INT8 convolutions that feed a SiLU, so ONNX Runtime can fuse each
    ``DQ → Conv → Q`` into ``QLinearConv`` (without it every convolution runs in float between
    dequantized tensors: slower than FP32).

    Ranges: the mean over the calibration images of each image's min and max, measured on the
    quantised graph itself (its bias-corrected convolutions); negatives kept only down to
    ``-max(positive range, floor)`` (SiLU maps anything below to ~0). Returns how many were added.
    """
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    targets = [n.output[0] for n in graph.node if n.op_type == "Conv"
               and producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "DequantizeLinear"
               and producer.get(n.input[1]) is not None and n.input[1] not in inits
               and {r.op_type for r in readers.get(n.output[0], [])} == {"Sigmoid", "Mul"}]
    if not targets:
        return 0
    probe = type(model)()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, 1, None) for t in targets)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    lows, highs = np.zeros(len(targets)), np.zeros(len(targets))
    for batch in calibration.batches("NCHW", 1):
        values = session.run(targets, {input_name: batch})
        lows += [float(v.min()) for v in values]
        highs += [float(v.max()) for v in values]
    lows, highs = lows / len(calibration), highs / len(calibration)
    zero = "conv_output_zero_point_uint8"
    graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zero))
    for tensor, low, high in zip(targets, lows, highs):
        bound = max(high, -max(low, -max(high, floor)), 1e-6)
        scale = f"{tensor}_scale"
        graph.initializer.append(numpy_helper.from_array(np.array(bound / 127.0, np.float32), scale))
        for reader in readers[tensor]:
            for i, name in enumerate(reader.input):
                if name == tensor:
                    reader.input[i] = f"{tensor}_dequantized"
        at = list(graph.node).index(producer[tensor]) + 1
        graph.node.insert(at, helper.make_node("DequantizeLinear", [f"{tensor}_quantized", scale, zero],
                                               [f"{tensor}_dequantized"], name=f"{tensor}_DequantizeLinear"))
        graph.node.insert(at, helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_quantized"],
                                               name=f"{tensor}_QuantizeLinear"))
    return len(targets)
