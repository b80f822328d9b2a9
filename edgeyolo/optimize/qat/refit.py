"""Post-training weight re-fit of the Q/DQ graph: each convolution solved for the INT8 inputs it really gets.

Bias correction takes out only the *mean* error a layer's INT8 adds. The error INT8 makes is more
than a mean: rounding and clipping a SiLU output to 255 levels distorts its distribution, and
every layer downstream reads the distortion as signal. AdaQuant (Hubara et al. 2021) answers it
without labels or training: walk the convolutions in execution order and, on the calibration
images, solve each one's float weights so that, fed the *quantised* network's actual inputs
(every earlier layer already re-fit), it reproduces the *FP32* network's output. Each layer thereby
also absorbs what the layers before it got wrong. Here it is one ridge least-squares solve per
convolution (the same normal equations as pruning's ``reconstruct``), pulled toward the FP32
weights; then the weights are rounded per channel as the deployed graph rounds them and the bias
re-solved for the rounded weights (which includes bias correction).

The student is a ``QdqGraph`` (the deployed Q/DQ graph, interpreted by torch, so inputs are
quantised exactly where and how ONNX Runtime and TensorRT quantise them), the teacher the FP32
graph. All calibration images advance through the student together, one node at a time, so the
whole re-fit costs about one forward pass of each graph plus one small solve per convolution.
The placement and the activation ranges are not changed: a build writes the Q/DQ ONNX again from
the re-fit float weights with the same ranges (``refit_onnx``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from onnx import helper

from ...errors import EdgeYoloError
from ..reconstruct import NormalEquations, _positions, _residual, _solve
from .fakequant import fake_quantize_weight
from .graph import QdqGraph, _key

POSITIONS_PER_IMAGE = 512  # sampled output positions per image and convolution
RIDGE = 1.0  # pull toward the FP32 weights, relative to the mean input energy (chosen on held-out images)
CHUNK = 8  # images computed together at each node (memory: one chunk's temporaries at a time)
MAX_IMAGES = 128  # every image's live activations are held at once: ~40 MB each at 640x640


@dataclass
class Refit:
    convs: int = 0
    images: int = 0
    # per convolution: relative output error (residual / target energy) before → after, on the fitting images
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def describe(self) -> dict:
        before = [a for a, _ in self.errors.values()]
        after = [b for _, b in self.errors.values()]
        mean = lambda v: round(sum(v) / len(v), 5) if v else 0.0  # noqa: E731
        return {"convs": self.convs, "images": self.images,
                "mean_relative_error": [mean(before), mean(after)]}


def _conv_geometry(node) -> SimpleNamespace:
    """What ``reconstruct.NormalEquations`` needs of a convolution, from an ONNX Conv node."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("group", 1) != 1:
        raise EdgeYoloError(f"refit: grouped convolution {node.name} is not supported")
    pads = attrs.get("pads", [0, 0, 0, 0])
    kernel = attrs.get("kernel_shape")
    return SimpleNamespace(kernel_size=tuple(kernel), dilation=tuple(attrs.get("dilations", [1, 1])),
                           padding=tuple(pads[:2]), stride=tuple(attrs.get("strides", [1, 1])))


def _fitted_convs(student: QdqGraph) -> list:
    """The student's convolutions with trainable weights and a bias, in execution order."""
    convs = []
    for node in student.nodes:
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        weight = student.weight_dq.get(node.input[1]) or student.float_of.get(node.input[1])
        bias = student.float_of.get(node.input[2])
        if weight and bias:
            convs.append((node, weight, bias))
    return convs


@torch.no_grad()
def refit(student: QdqGraph, teacher: QdqGraph, images: Sequence[torch.Tensor], *,
          positions_per_image: int = POSITIONS_PER_IMAGE, ridge: float = RIDGE,
          progress: Callable[[int, int], None] | None = None) -> Refit:
    """Re-fit ``student``'s convolution weights and biases in place (see the module docstring).

    ``images``: chunks of float NCHW network inputs (0..1), as the runtime prepares them (the first
    ``MAX_IMAGES`` are used); the teacher must be the float graph the student was quantised from
    (same node and tensor names)."""
    chunks, total = [], 0
    for chunk in images:
        chunk = chunk[:MAX_IMAGES - total].float()
        if len(chunk):
            chunks.append(chunk)
            total += len(chunk)
    if not chunks:
        raise EdgeYoloError("refit needs calibration images")
    student.eval()
    teacher.eval()
    convs = _fitted_convs(student)
    targets = _teacher_targets(teacher, [node for node, _, _ in convs], chunks, positions_per_image)
    report = Refit(images=sum(len(c) for c in chunks))
    fitted = {node.name: (index, weight, bias) for index, (node, weight, bias) in enumerate(convs)}

    def fit(node, states):
        if node.name in fitted:
            index, weight_name, bias_name = fitted[node.name]
            report.errors[node.name] = _refit_conv(student, node, weight_name, bias_name, states,
                                                   targets[node.name], index, positions_per_image, ridge)
            report.convs += 1
            if progress is not None:
                progress(report.convs, len(convs))

    student.run([{student.input_name: c} for c in chunks], before=fit)
    return report


def _teacher_targets(teacher: QdqGraph, nodes, chunks, per_image) -> dict[str, list[torch.Tensor]]:
    """The FP32 output of each convolution at the sampled positions, per chunk: one teacher pass."""
    index_of = {node.output[0]: (index, node.name) for index, node in enumerate(nodes)}
    targets: dict[str, list[torch.Tensor]] = {node.name: [None] * len(chunks) for node in nodes}

    def sample(node, states, chunk: int):
        if node.output[0] in index_of:
            index, name = index_of[node.output[0]]
            y = states[0][node.output[0]]
            n, channels, h, w = y.shape
            flat = y.permute(0, 2, 3, 1).reshape(-1, channels)
            targets[name][chunk] = flat[_positions(h * w, index, chunk, per_image, n)].double()

    for c, chunk in enumerate(chunks):  # chunk by chunk: the teacher's activations of one chunk at a time
        teacher.run([{teacher.input_name: chunk}], after=lambda node, states, c=c: sample(node, states, c))
    return targets


def _refit_conv(student: QdqGraph, node, weight_name: str, bias_name: str, states, targets, index,
                per_image, ridge) -> tuple[float, float]:
    geometry = _conv_geometry(node)
    eq = NormalEquations()
    for c, state in enumerate(states):  # the quantised input the deployed graph gives this conv
        eq.add(geometry, student._value(node.input[0], state), targets[c], index, c, per_image)
    gram, cross, energy = eq.gram, eq.cross, eq.energy
    weight = student.weights[_key(weight_name)]
    bias = student.weights[_key(bias_name)]
    quantized = weight_name in student.weight_dq.values()
    deployed = lambda w: fake_quantize_weight(w) if quantized else w  # noqa: E731
    current = _as_matrix(deployed(weight.double()), bias.double())
    before = _residual(current, gram, cross, energy)
    prior = _as_matrix(weight.double(), bias.double())
    solved = _solve(gram, cross, prior, ridge)
    new_weight = solved[:-1].T.reshape(weight.shape)
    rounded = deployed(new_weight).reshape(weight.shape[0], -1)
    # the bias that is best for the weights as they will be rounded: mean target minus mean response
    new_bias = (cross[-1] - gram[-1, :-1] @ rounded.T) / gram[-1, -1]
    after = _residual(_as_matrix(rounded.reshape(weight.shape), new_bias), gram, cross, energy)
    if after >= before:  # never make a layer worse than it was
        return before, before
    weight.copy_(new_weight.to(weight.dtype))
    bias.copy_(new_bias.to(bias.dtype))
    return before, after


def _as_matrix(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``W·x + b`` as one (Cin·k·k + 1, Cout) matrix."""
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1).T


def calibration_chunks(calibration) -> list[torch.Tensor]:
    """A ``CalibrationSet``'s network inputs in chunks of ``CHUNK``, as many as the re-fit uses."""
    return [torch.from_numpy(batch) for batch in
            itertools.islice(calibration.batches("NCHW", CHUNK), -(-MAX_IMAGES // CHUNK))]


def refit_onnx(src, qdq, calibration, dst, *, ridge: float = RIDGE,
               positions_per_image: int = POSITIONS_PER_IMAGE) -> Refit:
    """Write ``src`` (the float ONNX ``qdq`` was quantised from) to ``dst`` with re-fit weights.

    ``calibration``: the build's ``CalibrationSet`` (its letterboxed images are the fitting data).
    Writing the Q/DQ ONNX from ``dst`` with the same ranges (``quantize.write_qdq``) gives the
    deployed graph: its per-channel weight scales and int32 biases follow from the re-fit floats
    exactly as the student computed them."""
    import onnx
    from onnx import numpy_helper

    float_model = onnx.load(str(src))
    student = QdqGraph(qdq, float_model, learn_scales=False, trainable=False)
    teacher = QdqGraph(float_model, float_model, trainable=False)
    report = refit(student, teacher, calibration_chunks(calibration), ridge=ridge,
                   positions_per_image=positions_per_image)
    weights = student.float_weights()
    for init in float_model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].numpy(), init.name))
    onnx.save(float_model, str(dst))
    return report
