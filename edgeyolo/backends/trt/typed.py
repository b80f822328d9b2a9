"""The FP16-typed graph TensorRT compiles as a strongly typed network (TensorRT >= 10.12, and all of 11).

A strongly typed network takes every tensor's precision from the graph itself: the FP16
builder flag that let TensorRT run the float parts in FP16 is deprecated in 10.12 and gone
in 11. So the bundle carries the graph with its float parts already in FP16 — the Q/DQ
graph for INT8 targets (INT8 where the Q/DQ nodes say, FP16 elsewhere), the FP graph for
FP16 targets — with FP32 input and output, as the runtime feeds and reads them.

Written on the workstation at build time (ONNX Runtime's float16 converter, which keeps
``Resize``'s scales in FP32 correctly), so the device needs nothing new.
"""

from __future__ import annotations

from ...errors import EdgeYoloError

TYPED_FILE = "model-typed.onnx"
QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take float16 scales from opset 19


def fp16_typed(model):
    """A copy of ``model`` with its float tensors and weights in FP16, its inputs and outputs in FP32.

    A Q/DQ graph is first put in TensorRT's encoding (int8 zero points, float biases) and
    moved to opset 19, where Q/DQ nodes may carry FP16 scales, so that dequantized tensors
    are FP16 without a Cast between them and the layers they feed.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise EdgeYoloError("writing the FP16-typed graph for TensorRT >= 10.12 needs ONNX Runtime: "
                            "pip install 'edgeyolo[onnxruntime]'") from None
    from .encoding import QDQ_OPS, to_tensorrt_encoding

    model = onnx.ModelProto.FromString(model.SerializeToString())
    if any(node.op_type in QDQ_OPS for node in model.graph.node):
        to_tensorrt_encoding(model)
        if _default_opset(model) < QDQ_FP16_OPSET:
            from onnx import version_converter

            model = version_converter.convert_version(model, QDQ_FP16_OPSET)
    return convert_float_to_float16(model, keep_io_types=True)


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
