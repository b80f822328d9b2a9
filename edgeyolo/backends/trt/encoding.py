"""The Q/DQ ONNX in the encoding TensorRT parses; the numbers stay exactly the same.

``edgeyolo.quantize`` stores symmetric activations as uint8 with zero point 128, the form
ONNX Runtime's x86 integer kernels take, and biases as int32. TensorRT takes int8 with zero
point 0 and float biases. Both rewrites are exact, so the engine computes the graph whose
accuracy ``cpu-int8`` (or ``eval --backend onnxruntime``) measured.
"""

from __future__ import annotations

import numpy as np

from ...errors import EdgeYoloError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def to_tensorrt_encoding(model) -> dict:
    """Rewrite the Q/DQ graph in place for TensorRT: int8 zero points, float biases.

    ``clamp(round(x/s) + 128, 0, 255) - 128 == clamp(round(x/s), -128, 127)``, and a folded
    bias is the very float its DequantizeLinear computes.
    """
    return {"int8_zero_points": shift_uint8_zero_points(model), "folded_biases": fold_int32_bias(model)}


def shift_uint8_zero_points(model) -> int:
    """uint8 zero point 128 → int8 zero point 0 on every QuantizeLinear/DequantizeLinear."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    changed = 0
    for node in graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zp_name = node.input[2]
        zero = inits.get(zp_name)
        if zero is None or zero.data_type != TensorProto.UINT8:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            raise EdgeYoloError(f"{node.name}: uint8 constant data cannot be re-encoded for TensorRT")
        values = numpy_helper.to_array(zero)
        if np.any(values != 128):
            raise EdgeYoloError(f"{node.name}: asymmetric activation quantization (zero point {values.ravel()[0]}); "
                                "TensorRT needs symmetric scales")
        if zp_name not in renamed:
            renamed[zp_name] = f"{zp_name}_int8"
            graph.initializer.append(numpy_helper.from_array(np.zeros(values.shape, np.int8), renamed[zp_name]))
        node.input[2] = renamed[zp_name]
        changed += 1
    _drop_unused_initializers(graph)
    return changed


def fold_int32_bias(model) -> int:
    """Replace ``DequantizeLinear(int32 bias)`` by its float value (TensorRT dequantizes int8/fp8/int4 only).

    The float bias is exactly what the DequantizeLinear computes, so the graph's numbers do not change.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        data = inits[node.input[0]]
        if data.data_type != TensorProto.INT32:
            continue
        values = numpy_helper.to_array(data).astype(np.int64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        has_zero = len(node.input) > 2 and node.input[2]
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if has_zero else 0
        bias = (values - zero).astype(np.float32) * scale  # as DequantizeLinear computes it, in float32
        graph.initializer.append(numpy_helper.from_array(bias, name=node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(folded)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
