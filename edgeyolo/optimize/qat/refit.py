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

``weighting="activation"`` (opt-in; measured in docs/int8.md, not the default) fits each output's
error as it is *after* the SiLU or sigmoid that follows it (``weighted_solve``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from onnx import helper

from ...errors import EdgeYoloError
from ...targets import REFIT_WEIGHTINGS
from ..reconstruct import NormalEquations, _positions, _residual, _solve
from .fakequant import fake_quantize_weight
from .graph import QdqGraph, _key

POSITIONS_PER_IMAGE = 512  # sampled output positions per image and convolution
RIDGE = 1.0  # pull toward the FP32 weights, relative to the mean input energy (chosen on held-out images)
CHUNK = 8  # images computed together at each node (memory: one chunk's temporaries at a time)
MAX_IMAGES = 128  # every image's live activations are held at once: ~40 MB each at 640x640
WEIGHTING = "none"  # the error each output's fit minimises: before ("none") or, weighted, after its activation
CG_ITERATIONS = 8  # conjugate-gradient steps of the weighted solve (preconditioned: converges in a few)


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
          positions_per_image: int = POSITIONS_PER_IMAGE, ridge: float = RIDGE, weighting: str = WEIGHTING,
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
    if weighting not in REFIT_WEIGHTINGS:
        raise EdgeYoloError(f"refit weighting must be one of {', '.join(REFIT_WEIGHTINGS)}, not {weighting!r}")
    targets = _teacher_targets(teacher, [node for node, _, _ in convs], chunks, positions_per_image)
    activations = _activations(student) if weighting == "activation" else {}
    report = Refit(images=sum(len(c) for c in chunks))
    fitted = {node.name: (index, weight, bias) for index, (node, weight, bias) in enumerate(convs)}

    def fit(node, states):
        if node.name in fitted:
            index, weight_name, bias_name = fitted[node.name]
            report.errors[node.name] = _refit_conv(student, node, weight_name, bias_name, states,
                                                   targets[node.name], index, positions_per_image, ridge,
                                                   activations.get(node.name))
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


def _activations(graph: QdqGraph) -> dict[str, str]:
    """Conv name → the nonlinearity its output goes through next: ``silu`` (read by a Sigmoid and a
    Mul, as YOLOv5 exports SiLU) or ``sigmoid`` (the head, through reshapes); absent when linear."""
    readers: dict[str, list] = {}
    for node in graph.nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for node in graph.nodes:
        if node.op_type != "Conv":
            continue
        tensor, ops = node.output[0], []
        while True:
            nexts = readers.get(tensor, [])
            ops = sorted(n.op_type for n in nexts)
            if len(nexts) == 1 and ops[0] in ("Reshape", "Transpose"):
                tensor = nexts[0].output[0]
                continue
            break
        if ops == ["Mul", "Sigmoid"]:
            found[node.name] = "silu"
        elif ops == ["Sigmoid"]:
            found[node.name] = "sigmoid"
    return found


def _slope(y: torch.Tensor, activation: str) -> torch.Tensor:
    """d activation / d y at the FP32 pre-activation ``y``: how much an error there reaches the output."""
    s = torch.sigmoid(y)
    return s * (1 + y * (1 - s)) if activation == "silu" else s * (1 - s)


def _refit_conv(student: QdqGraph, node, weight_name: str, bias_name: str, states, targets, index,
                per_image, ridge, activation: str | None = None) -> tuple[float, float]:
    geometry = _conv_geometry(node)
    eq = NormalEquations(keep_rows=activation is not None)
    for c, state in enumerate(states):  # the quantised input the deployed graph gives this conv
        eq.add(geometry, student._value(node.input[0], state), targets[c], index, c, per_image)
    gram, cross, energy = eq.gram, eq.cross, eq.energy
    weight = student.weights[_key(weight_name)]
    bias = student.weights[_key(bias_name)]
    quantized = weight_name in student.weight_dq.values()
    deployed = lambda w: fake_quantize_weight(w) if quantized else w  # noqa: E731
    current = _as_matrix(deployed(weight.double()), bias.double())
    prior = _as_matrix(weight.double(), bias.double())
    solved = _solve(gram, cross, prior, ridge)
    if activation is not None:  # its own (weighted) error before and after
        return _refit_weighted(eq, activation, weight, bias, deployed, current, prior, solved, ridge)
    before = _residual(current, gram, cross, energy)
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


def _refit_weighted(eq: NormalEquations, activation: str, weight, bias, deployed, current, prior, start,
                    ridge: float) -> tuple[float, float]:
    """The re-fit with each output's error weighted by the activation's slope² at the FP32 target
    (the Gauss-Newton form of the error *after* the activation).

    Where SiLU is flat (far-negative outputs, most positions of a deep layer) an error does not
    reach the next layer, and fitting it there moves the outputs that do matter."""
    rows = torch.cat([a for a, _ in eq.rows])
    y = torch.cat([t for _, t in eq.rows])
    eq.rows.clear()  # the batches' copies: the layer's rows are the largest memory of the re-fit
    v = _slope(y, activation).square()
    energy = max(float((v * y * y).sum()), 1e-12)

    def loss(matrix) -> float:
        r = rows @ matrix.float() - y
        return float((v * r * r).sum()) / energy

    before = loss(current)
    solved = weighted_solve(rows, y, v, eq.gram, prior, start, ridge)
    new_weight = solved[:-1].T.reshape(weight.shape)
    rounded = deployed(new_weight).reshape(weight.shape[0], -1)
    residual = y - rows[:, :-1] @ rounded.T.float()  # the weighted-best bias for the rounded weights
    new_bias = ((v * residual).sum(0) / v.sum(0).clamp_min(1e-12)).double()
    after = loss(_as_matrix(rounded.reshape(weight.shape), new_bias))
    if after >= before:
        return before, before
    weight.copy_(new_weight.to(weight.dtype))
    bias.copy_(new_bias.to(bias.dtype))
    return before, after


def weighted_solve(rows: torch.Tensor, y: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, prior: torch.Tensor,
                   start: torch.Tensor, ridge: float, iterations: int = CG_ITERATIONS) -> torch.Tensor:
    """argmin over each column c of Σ_p v[p,c]·(rows[p]·x_c − y[p,c])² + λ·m_c·‖x_c − prior_c‖².

    One normal-equations matrix per output channel would not fit in memory (Cin·k·k squared, times
    Cout), so every channel is solved at once by conjugate gradients from ``start``, preconditioned
    by the unweighted ``gram`` (= rowsᵀrows) scaled by the channel's mean weight m_c: the weights
    only reshape the same rows, so a few steps converge. λ is ``ridge`` × the mean of gram's
    diagonal, as in the unweighted solve."""
    mass = v.mean(0).clamp_min(1e-6).double()
    lam = ridge * float(torch.diagonal(gram).mean())
    factor = torch.linalg.cholesky(gram + lam * torch.eye(len(gram), dtype=gram.dtype))

    def hessian(x):  # (rowsᵀ·V·rows + λ·m_c) x, every channel at once
        return (rows.T @ (v * (rows @ x.float()))).double() + lam * mass * x

    def precondition(r):
        return torch.cholesky_solve(r, factor) / mass

    x = start.clone()
    r = (rows.T @ (v * y)).double() + lam * mass * prior - hessian(x)
    z = precondition(r)
    p, rz = z.clone(), (r * z).sum(0)
    for _ in range(iterations):
        hp = hessian(p)
        alpha = rz / (p * hp).sum(0).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * hp
        z = precondition(r)
        rz, rz_old = (r * z).sum(0), rz
        p = z + (rz / rz_old.clamp_min(1e-30)) * p
    return x


def _as_matrix(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``W·x + b`` as one (Cin·k·k + 1, Cout) matrix."""
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1).T


def calibration_chunks(calibration) -> list[torch.Tensor]:
    """A ``CalibrationSet``'s network inputs in chunks of ``CHUNK``, as many as the re-fit uses."""
    return [torch.from_numpy(batch) for batch in
            itertools.islice(calibration.batches("NCHW", CHUNK), -(-MAX_IMAGES // CHUNK))]


def refit_onnx(src, qdq, calibration, dst, *, ridge: float = RIDGE, weighting: str = WEIGHTING,
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
    report = refit(student, teacher, calibration_chunks(calibration), ridge=ridge, weighting=weighting,
                   positions_per_image=positions_per_image)
    weights = student.float_weights()
    for init in float_model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].numpy(), init.name))
    onnx.save(float_model, str(dst))
    return report
