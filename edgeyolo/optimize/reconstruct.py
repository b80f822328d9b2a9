"""Least-squares reconstruction after pruning: each layer re-fit to reproduce the unpruned model's output.

One-shot structured pruning removes inputs every next convolution was relying on, and the errors
multiply through the network (yolov5n at 30 % fewer GFLOPs keeps ~1 % of its mAP with BatchNorm
re-estimated). Channel-pruning work (He et al. 2017, ThiNet) answers this without labels or
training: walk the layers in execution order and, on a few unlabelled images, solve for each
convolution's weights so that, fed the *pruned* network's actual inputs, it reproduces the
*original* network's output for the channels it kept. Each layer therefore also corrects what
the layers before it got wrong. It is one linear solve per layer (seconds), not an epoch.

The kept channels are found by matching BatchNorm (scale, shift) pairs with the original model's
(pruning copies them unchanged), so any freshly pruned checkpoint can be reconstructed from the
model it was pruned from. Each ``Conv`` block's fit ``W·x + b`` is written back as conv weights
plus BatchNorm statistics measured on the same data, so the block is unchanged in structure and
its BatchNorm normalises the same way in training as in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import EdgeYoloError
from ..model.blocks import Conv, fuse_conv_bn

POSITIONS_PER_IMAGE = 1024  # sampled output positions per image and layer (enough rows for any layer here)
RIDGE = 1e-3  # pull toward the pruned layer's own weights, relative to the mean input energy


@dataclass
class Reconstruction:
    layers: int = 0
    images: int = 0
    # per layer: relative output error (residual / target energy) before → after the fit, on the fitting data
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"layers": self.layers, "images": self.images,
                "relative_error": {k: [round(a, 4), round(b, 4)] for k, a, b in
                                   ((k, *v) for k, v in self.errors.items())}}


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has seen its input: the rest of the forward is waste."""


def kept_channels(student: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """For every ``Conv`` block: the teacher's output-channel index of each student channel.

    Pruning copies BatchNorm's (weight, bias) of the channels it keeps, so each student pair equals
    exactly one teacher pair. Head convolutions keep all their outputs (they are not pruned)."""
    teacher_modules = dict(teacher.named_modules())
    kept: dict[str, torch.Tensor] = {}
    for name, module in student.named_modules():
        if isinstance(module, Conv):
            original = teacher_modules.get(name)
            if not isinstance(original, Conv) or not hasattr(module, "bn") or not hasattr(original, "bn"):
                raise EdgeYoloError(f"reconstruction: layer {name} has no unfused counterpart in the original model")
            kept[name] = _match_rows(module.bn, original.bn, name)
    for i, conv in enumerate(student.detect.m):
        kept[f"{_detect_name(student)}.m.{i}"] = torch.arange(conv.out_channels)
    return kept


def _match_rows(bn: nn.BatchNorm2d, original: nn.BatchNorm2d, name: str) -> torch.Tensor:
    pairs = torch.stack([bn.weight.detach(), bn.bias.detach()], 1)
    reference = torch.stack([original.weight.detach(), original.bias.detach()], 1)
    equal = (pairs[:, None, :] == reference[None, :, :]).all(-1)
    found = equal.any(1)
    if not bool(found.all()):
        raise EdgeYoloError(f"reconstruction: layer {name} has channels the original model does not have "
                            "(reconstruct a freshly pruned model from the model it was pruned from)")
    return equal.float().argmax(1)


def _detect_name(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is model.detect:
            return name
    raise EdgeYoloError("reconstruction: the model has no Detect head")


def _fitted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name → the layer whose fit is ``W·x + b``: a ``Conv`` block (target: its BatchNorm's output)
    or a head convolution (target: its own output)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, Conv)}
    head = _detect_name(model)
    layers.update({f"{head}.m.{i}": conv for i, conv in enumerate(model.detect.m)})
    return layers


def _conv(layer: nn.Module) -> nn.Conv2d:
    """The convolution whose weights a layer's fit replaces."""
    return layer.conv if isinstance(layer, Conv) else layer


def _target(layer: nn.Module) -> nn.Module:
    """The module whose output the fit reproduces (before the activation)."""
    return layer.bn if isinstance(layer, Conv) else layer


@torch.no_grad()
def _execution_order(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> list[str]:
    order = []
    handles = [_conv(layer).register_forward_pre_hook(lambda m, args, name=name: order.append(name))
               for name, layer in layers.items()]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _positions(count: int, layer: int, batch: int, per_image: int, images: int) -> torch.Tensor:
    """Sampled flat (image, position) indices, the same for teacher and student of one layer and batch."""
    generator = torch.Generator().manual_seed(layer * 100_003 + batch)
    take = min(per_image, count)
    picks = [torch.randperm(count, generator=generator)[:take] + i * count for i in range(images)]
    return torch.cat(picks)


def _output_positions(conv, x: torch.Tensor) -> int:
    """Output positions per image (L = H_out · W_out) of ``conv`` on ``x``."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    h, w = x.shape[2:]
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _sampled_columns(conv, x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The rows ``picks`` (flat image · L + position) of im2col(``x``) for ``conv``: (len(picks), Cin·kh·kw).

    Gathered directly, in ``unfold``'s column order (channel, then kernel row, then column), so the
    full im2col (hundreds of MB for an early layer) is never built."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_image = _output_positions(conv, x)
    image, position = picks // per_image, picks % per_image
    top, left = (position // w_out) * sh, (position % w_out) * sw
    padded = nn.functional.pad(x, (pw, pw, ph, ph))
    taps = [padded[image, :, top + ky * dh, left + kx * dw] for ky in range(kh) for kx in range(kw)]
    return torch.stack(taps, -1).reshape(len(picks), -1)


@torch.no_grad()
def reconstruct(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], *,
                positions_per_image: int = POSITIONS_PER_IMAGE, ridge: float = RIDGE,
                progress: Callable[[int, int], None] | None = None) -> Reconstruction:
    """Re-fit every convolution of ``student`` (pruned from ``teacher``) in place, in execution order.

    ``batches``: float NCHW tensors in 0..1 (unlabelled images; training mosaics, see
    ``batchnorm.training_batches``, so the written BatchNorm statistics are training's).
    Both models end in eval mode; the teacher is not changed."""
    batches = list(batches)
    if not batches:
        raise EdgeYoloError("reconstruction needs calibration images")
    student.eval()
    teacher.eval()
    kept = kept_channels(student, teacher)
    student_layers, teacher_layers = _fitted_layers(student), _fitted_layers(teacher)
    for name, layer in student_layers.items():
        if _conv(layer).groups != 1:
            raise EdgeYoloError(f"reconstruction: grouped convolution {name} is not supported")
    order = _execution_order(student, student_layers, batches[0][:1])
    targets = _teacher_targets(teacher, teacher_layers, order, kept, batches, positions_per_image)
    report = Reconstruction(images=sum(int(b.shape[0]) for b in batches))
    for index, name in enumerate(order):
        layer = student_layers[name]
        eq = _normal_equations(student, _conv(layer), batches, targets[name], index, positions_per_image)
        current = _current_weights(layer)
        before = _residual(current, eq.gram, eq.cross, eq.energy)
        weights = _solve(eq.gram, eq.cross, current, ridge)
        after = _residual(weights, eq.gram, eq.cross, eq.energy)
        _write_back(layer, weights, eq.gram, eq.count)
        report.errors[name] = (before, after)
        report.layers += 1
        if progress is not None:
            progress(index + 1, len(order))
    student.eval()
    return report


def _teacher_targets(teacher, layers, order, kept, batches, per_image) -> dict[str, list[torch.Tensor]]:
    """Teacher outputs (the kept channels) at the sampled positions, per layer and batch: one teacher pass."""
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in order}
    current = {"batch": 0}
    handles = []
    for index, name in enumerate(order):
        def hook(module, args, output, name=name, index=index):
            n, c, h, w = output.shape
            flat = output.permute(0, 2, 3, 1).reshape(-1, c)[:, kept[name]]
            picks = _positions(h * w, index, current["batch"], per_image, n)
            targets[name].append(flat[picks].float())
        handles.append(_target(layers[name]).register_forward_hook(hook))
    try:
        for b, batch in enumerate(batches):
            current["batch"] = b
            teacher(batch)
    finally:
        for h in handles:
            h.remove()
    return targets


class NormalEquations:
    """AᵀA, AᵀY, Σ‖Y‖² and the row count, summed batch by batch; A = [im2col(input), 1] at the
    sampled output positions of one layer (the same positions as its targets, see ``_positions``)."""

    def __init__(self, keep_rows: bool = False):
        self.gram = self.cross = None
        self.energy, self.count = 0.0, 0
        # the rows themselves (float32), for objectives the normal equations cannot express (weighted per output)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep_rows else None

    def add(self, conv, x: torch.Tensor, y: torch.Tensor, layer: int, batch: int, per_image: int) -> None:
        picks = _positions(_output_positions(conv, x), layer, batch, per_image, x.shape[0])
        a = torch.cat([_sampled_columns(conv, x, picks).double(), torch.ones(len(picks), 1, dtype=torch.float64)], 1)
        y = y.double()
        self.gram = a.T @ a if self.gram is None else self.gram + a.T @ a
        self.cross = a.T @ y if self.cross is None else self.cross + a.T @ y
        self.energy += float((y * y).sum())
        self.count += len(picks)
        if self.rows is not None:
            self.rows.append((a.float(), y.float()))


def _normal_equations(student, conv, batches, targets, index, per_image) -> NormalEquations:
    """The normal equations of ``conv`` over every batch, fed the student's own input to it."""
    equations = NormalEquations()
    captured = {}

    def hook(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = conv.register_forward_pre_hook(hook)
    try:
        for b, batch in enumerate(batches):
            try:
                student(batch)
            except _Stop:
                pass
            equations.add(conv, captured.pop("x"), targets[b], index, b, per_image)
    finally:
        handle.remove()
    return equations


def _current_weights(layer: nn.Module) -> torch.Tensor:
    """The layer as it is now, as one (Cin·k·k + 1, Cout) matrix of ``W·x + b`` (BatchNorm folded in)."""
    conv = fuse_conv_bn(layer.conv, layer.bn) if isinstance(layer, Conv) else layer
    weight = conv.weight.detach().double().reshape(conv.out_channels, -1)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                 dtype=torch.float64)
    return torch.cat([weight, bias[:, None]], 1).T


def _solve(gram, cross, prior, ridge) -> torch.Tensor:
    """argmin ‖A·W − Y‖² + λ‖W − prior‖² (λ relative to A's mean energy per column)."""
    lam = ridge * float(torch.diagonal(gram).mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, cross + lam * prior)


def _residual(weights, gram, cross, energy) -> float:
    """‖A·W − Y‖² / ‖Y‖² from the normal equations alone."""
    value = float((weights * (gram @ weights)).sum() - 2 * (weights * cross).sum() + energy)
    return max(value, 0.0) / max(energy, 1e-12)


def _write_back(module: nn.Module, weights, gram, count) -> None:
    """Store the fit ``W·x + b``: head convs directly; ``Conv`` blocks as conv weights + BatchNorm whose
    statistics are those of ``W·x`` on the fitting data, and whose affine part restores ``W·x + b``."""
    conv = _conv(module)
    weight, bias = weights[:-1].T, weights[-1]
    conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight.dtype))
    if not isinstance(module, Conv):
        conv.bias.copy_(bias.to(conv.bias.dtype))
        return
    moments = gram / count  # E[a aᵀ], the last column the means of the inputs
    mean_x = moments[:-1, -1]
    covariance = moments[:-1, :-1] - torch.outer(mean_x, mean_x)
    mean = weight @ mean_x
    variance = ((weight @ covariance) * weight).sum(1).clamp_min(0)
    bn = module.bn
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(variance.to(bn.running_var.dtype))
    bn.weight.copy_(torch.sqrt(variance + bn.eps).to(bn.weight.dtype))
    bn.bias.copy_((bias + mean).to(bn.bias.dtype))
