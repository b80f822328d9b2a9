"""A Q/DQ (or float) YOLOv5 ONNX graph run by torch, trainable: the deployed INT8 graph as a ``nn.Module``.

Interpreting the ONNX the quantiser wrote, rather than re-deriving its placement in torch, makes the
fake-quantised model the deployed one by construction: the same tensors quantised (head decode,
``keep_float`` blocks and float stages left alone), shared scales shared (a Resize reuses its
input's scale), BatchNorm folded. Only the few ops an exported YOLOv5 contains are supported.

- activation QuantizeLinear→DequantizeLinear: one ``ActivationQuantizer`` per scale initializer;
- a DequantizeLinear of an int8 Conv weight ``W_quantized``: the float weight ``W`` (from the float
  graph) fake-quantised per channel; of an int32 bias: the float bias rounded to input scale × weight scale;
- float Conv weights and biases (layers kept float): trainable as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from ...errors import EdgeYoloError
from .fakequant import (
    ActivationQuantizer,
    fake_quantize_weight,
    round_ste,
    weight_scale,
)

QUANTIZED_SUFFIX = "_quantized"
FIXED_SCALES = ("images_scale",)  # the input is pixels / 255: its range is known, not learned


def _key(name: str) -> str:
    """A ParameterDict / ModuleDict key for an ONNX name (no dots allowed there)."""
    return name.replace(".", "·")


class QdqGraph(nn.Module):
    """``qdq`` (a Q/DQ ONNX, or a float one) with float weights from ``float_model``; forward → named tensors."""

    def __init__(self, qdq, float_model, learn_scales: bool = True, trainable: bool = True):
        super().__init__()
        self.graph = qdq.graph
        self.input_name = qdq.graph.input[0].name
        self.output_names = [o.name for o in qdq.graph.output]
        consts = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        floats = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
        self.weights = nn.ParameterDict()
        self.quantizers = nn.ModuleDict()
        self.constants: dict[str, str] = {}  # initializer name → buffer name (buffers follow .to(device))
        self.weight_dq: dict[str, str] = {}  # DQ output → float weight name (fake-quantised per channel)
        self.float_of: dict[str, str] = {}  # tensor → float weight / bias name (used as it is)
        self.q_scale: dict[str, str] = {}  # Q output → scale initializer name
        self.q_input: dict[str, str] = {}  # Q output → the float tensor it quantises
        self.nodes = []
        conv_params = {x for n in qdq.graph.node if n.op_type == "Conv" for x in n.input[1:]}
        for node in qdq.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in consts:
                self._weight_dequantize(node, consts, floats)
            elif node.op_type == "QuantizeLinear":
                self._activation_quantize(node, consts, learn_scales)
            elif node.op_type == "DequantizeLinear":
                pass  # reads a Q output: the fake quantiser already produced the dequantised value
            else:
                self.nodes.append(node)
        self.bias_dq: dict[str, tuple[str, str]] = {}  # int32 bias DQ output → (its Conv's input Q output, weight DQ output)
        for node in qdq.graph.node:
            if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in self.float_of \
                    and node.input[1] in self.weight_dq:
                self.bias_dq[node.input[2]] = (self._dq_source_of(qdq, node.input[0]), node.input[1])
        for name in conv_params:
            if name and name in consts and name not in self.float_of:
                self._add_weight(name, floats.get(name, consts[name]))
                self.float_of[name] = name
        for name, value in consts.items():
            if name not in self.float_of and value.dtype != np.int8:
                self.constants[name] = f"const_{len(self.constants)}"
                self.register_buffer(self.constants[name], torch.from_numpy(np.array(value)), persistent=False)
        for p in self.weights.values():
            p.requires_grad_(trainable)
        self._dq_source = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
        self._last_read = self._last_reads()

    # ------------------------------------------------------------------ construction
    def _add_weight(self, name: str, value: np.ndarray) -> None:
        if _key(name) not in self.weights:
            self.weights[_key(name)] = nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)))

    def _weight_dequantize(self, node, consts, floats) -> None:
        stored = node.input[0]
        if not stored.endswith(QUANTIZED_SUFFIX) or stored[:-len(QUANTIZED_SUFFIX)] not in floats:
            raise EdgeYoloError(f"QAT: cannot find the float tensor behind {stored} in the float graph")
        name = stored[:-len(QUANTIZED_SUFFIX)]
        self._add_weight(name, floats[name])
        if consts[stored].dtype == np.int8:
            self.weight_dq[node.output[0]] = name
        else:  # int32 bias
            self.float_of[node.output[0]] = name

    def _activation_quantize(self, node, consts, learn_scales: bool) -> None:
        scale_name, zp_name = node.input[1], node.input[2]
        zero_point = consts.get(zp_name)
        if zero_point is None or zero_point.dtype != np.uint8 or zero_point.size != 1:
            raise EdgeYoloError(f"QAT: {node.name}: expected one uint8 zero point (128 where symmetric), "
                                f"found {zero_point!r}")
        if _key(scale_name) not in self.quantizers:
            scale = float(consts[scale_name])
            self.quantizers[_key(scale_name)] = ActivationQuantizer(
                scale, learnable=learn_scales and scale_name not in FIXED_SCALES, zero_point=int(zero_point))
        self.q_scale[node.output[0]] = scale_name
        self.q_input[node.output[0]] = node.input[0]

    def _dq_source_of(self, qdq, tensor: str) -> str:
        for node in qdq.graph.node:
            if node.op_type == "DequantizeLinear" and node.output[0] == tensor and node.input[0] in self.q_scale:
                return node.input[0]
        raise EdgeYoloError(f"QAT: a quantised Conv reads {tensor}, which is not a dequantised activation")

    # ------------------------------------------------------------------ run
    def forward(self, images: torch.Tensor, capture=()) -> dict[str, torch.Tensor]:
        """The graph outputs and the ``capture`` tensors (by ONNX name), for a batch of any size."""
        wanted = (*self.output_names, *capture)
        values: dict[str, torch.Tensor] = {self.input_name: images}
        self.run([values], keep=wanted)
        return {name: values[name] for name in wanted}

    def run(self, states: list[dict], before=None, after=None, keep=()) -> None:
        """Run the graph node by node on every state (tensors by ONNX name, the input set: one chunk of
        images each), dropping what no later node reads, except ``keep``.

        ``before(node, states)`` is called before a node is computed, ``after(node, states)`` after."""
        batches = [(state[self.input_name].shape[0], state[self.input_name].device) for state in states]
        for step, node in enumerate(self.nodes):
            if before is not None:
                before(node, states)
            for state, (batch, device) in zip(states, batches):
                inputs = [self._value(name, state) if name else None for name in node.input]
                state[node.output[0]] = run_op(node, inputs, batch, device)
            if after is not None:
                after(node, states)
            for state in states:
                for name in [n for n in state if self._last_read.get(n, -1) <= step and n not in keep]:
                    del state[name]

    def _last_reads(self) -> dict[str, int]:
        """Tensor name → index of the last node that reads it (a DQ output reads its quantiser's input too)."""
        last = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if not name:
                    continue
                last[name] = index
                source = self._dq_source.get(name)
                if source in self.q_scale:
                    last[self.q_input[source]] = index
        return last

    def _value(self, name: str, values: dict) -> torch.Tensor:
        if name in values:
            return values[name]
        if name in self.weight_dq:
            value = fake_quantize_weight(self.weights[_key(self.weight_dq[name])])
        elif name in self.bias_dq:  # int32, scale = input scale × weight scale (per channel)
            q_out, weight_dq = self.bias_dq[name]
            scale = self.quantizers[_key(self.q_scale[q_out])].scale * weight_scale(
                self.weights[_key(self.weight_dq[weight_dq])]).flatten()
            value = round_ste(self.weights[_key(self.float_of[name])] / scale) * scale
        elif name in self.float_of:
            value = self.weights[_key(self.float_of[name])]
        elif name in self.constants:
            return getattr(self, self.constants[name])
        elif name in self._dq_source and self._dq_source[name] in self.q_scale:  # DQ(Q(x))
            q_out = self._dq_source[name]
            value = self.quantizers[_key(self.q_scale[q_out])](self._value(self.q_input[q_out], values))
        else:
            raise EdgeYoloError(f"QAT: the graph reads {name!r} before anything writes it")
        values[name] = value
        return value

    def shift_biases(self, qdq, shifts: dict) -> int:
        """Move int32 biases by ``shifts`` (``quantize.bias_shifts``: initializer name → steps) of their scale in ``qdq``.

        So training starts from the bias-corrected PTQ graph a build writes, not the uncorrected one.
        ``qdq`` may be written at another input size: the ranges, hence the bias scales, are the same.
        """
        consts = {i.name: i for i in qdq.graph.initializer}
        moved = 0
        for node in qdq.graph.node:
            stored = node.input[0] if node.op_type == "DequantizeLinear" else None
            if stored not in shifts or not stored.endswith(QUANTIZED_SUFFIX):
                continue
            key = _key(stored[:-len(QUANTIZED_SUFFIX)])
            if key not in self.weights:
                raise EdgeYoloError(f"QAT: bias correction names {stored}, which this graph does not have")
            scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
            delta = torch.from_numpy((np.asarray(shifts[stored], dtype=np.float64) * scale).astype(np.float32))
            with torch.no_grad():
                self.weights[key] -= delta.to(self.weights[key].device)
            moved += 1
        return moved

    # ------------------------------------------------------------------ results
    def float_weights(self) -> dict[str, torch.Tensor]:
        """The trained float weights and biases by ONNX initializer name."""
        return {name.replace("·", "."): p.detach().cpu().clone() for name, p in self.weights.items()}

    def scales(self) -> dict[str, float]:
        """The activation scales by scale-initializer name."""
        return {name.replace("·", "."): float(q.scale.detach()) for name, q in self.quantizers.items()}

    def zero_points(self) -> dict[str, int]:
        """The activation zero points by scale-initializer name (128 everywhere when symmetric)."""
        return {name.replace("·", "."): q.zero_point for name, q in self.quantizers.items()}

    def scale_parameters(self) -> list[nn.Parameter]:
        return [q.log_gain for q in self.quantizers.values() if q.log_gain.requires_grad]


def run_op(node, x: list, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """One ONNX node of an exported YOLOv5 (batch taken from the data: the export's batch is 1)."""
    op = node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op == "Conv":
        pads = attrs.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            raise EdgeYoloError(f"QAT: {node.name}: asymmetric padding is not supported")
        return F.conv2d(x[0], x[1], x[2] if len(x) > 2 else None, stride=attrs.get("strides", 1),
                        padding=pads[:2], dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))
    if op == "Sigmoid":
        return torch.sigmoid(x[0])
    if op == "Mul":
        return x[0] * x[1]
    if op == "Add":
        return x[0] + x[1]
    if op == "Concat":
        return torch.cat(x, attrs["axis"])
    if op == "MaxPool":
        pads = attrs.get("pads", [0, 0, 0, 0])
        return F.max_pool2d(x[0], attrs["kernel_shape"], attrs.get("strides", 1), pads[:2],
                            ceil_mode=bool(attrs.get("ceil_mode", 0)))
    if op == "Resize":
        if attrs.get("mode", b"nearest") != b"nearest" or x[2] is None:
            raise EdgeYoloError(f"QAT: {node.name}: only nearest Resize by scales is supported")
        return F.interpolate(x[0], scale_factor=[float(s) for s in x[2][2:]], mode="nearest")
    if op == "Reshape":
        shape = [int(s) for s in x[1]]
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        shape[0] = batch if shape[0] == 1 else shape[0]
        return x[0].reshape(shape)
    if op == "Transpose":
        return x[0].permute(*attrs["perm"])
    if op == "Constant":
        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"]))).to(device)
    raise EdgeYoloError(f"QAT: ONNX op {op} ({node.name}) is not supported by the QAT graph")
