"""An engine that takes the letterboxed image itself: BGR uint8 HWC in, the float network behind it.

Converting the 640x640 letterbox to RGB float32 NCHW in 0..1 is a full pass over 4.9 MB on
the host for every frame. Prepended to the graph, the same steps (layout change and channel
swap on 1.2 MB of bytes, then cast and divide) run inside the engine's own optimised,
multi-threaded kernels, and the host hands over its letterbox buffer without a copy.

The manifest's ``input`` records what the engine takes (``UINT8_INPUT``), so the runtime feeds
the right thing and bundles built before this keep their float input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UINT8_INPUT = {"layout": "NHWC", "dtype": "uint8", "channel_order": "BGR"}
OPTION = "uint8_input"


def manifest_input(shape_nchw) -> dict:
    """The manifest's ``input`` fields of a uint8 NHWC BGR engine input with the float graph's NCHW shape."""
    batch, _, height, width = shape_nchw
    return {**UINT8_INPUT, "shape": [batch, height, width, 3]}


def prepend_to_onnx(path: Path) -> list:
    """Rewrite the ONNX at ``path`` to take BGR uint8 NHWC; returns its NCHW float input shape.

    The new nodes: Transpose (NHWC → NCHW) and Gather (BGR → RGB) on bytes, then Cast to
    float32 and Div by 255, exactly the host's ``float32(x) / 255``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    old = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    if old.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1] != 3:
        raise ValueError(f"{path}: expected a float N x 3 x H x W input, not {dims}")
    name, inner = old.name, f"{old.name}_float_nchw"
    for node in graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    prefix = "edgeyolo_input_"
    nodes = [
        helper.make_node("Transpose", [name], [prefix + "nchw"], perm=[0, 3, 1, 2], name=prefix + "transpose"),
        helper.make_node("Gather", [prefix + "nchw", prefix + "rgb_index"], [prefix + "rgb"], axis=1,
                         name=prefix + "bgr_to_rgb"),
        helper.make_node("Cast", [prefix + "rgb"], [prefix + "float"], to=TensorProto.FLOAT, name=prefix + "cast"),
        helper.make_node("Div", [prefix + "float", prefix + "255"], [inner], name=prefix + "scale"),
    ]
    graph.initializer.extend([numpy_helper.from_array(np.array([2, 1, 0], np.int64), prefix + "rgb_index"),
                              numpy_helper.from_array(np.array(255.0, np.float32), prefix + "255")])
    nhwc = [dims[0], dims[2], dims[3], 3]
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, nhwc)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return dims
