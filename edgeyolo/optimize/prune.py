"""Structured channel pruning with torch-pruning's dependency graph: channels really leave the model.

The graph couples every layer that shares a channel (C3's residual bottlenecks, the concatenations
of the neck, SPPF's pooled copies), so one decision removes a channel everywhere it lives. The
Detect head's output convolutions are ignored: its ``na·(5+nc)`` outputs are the model's contract.
What comes out is a smaller ``Model`` whose new widths are simply its tensors' shapes — exactly
what ``save_model``/``load_native`` round-trip.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import EdgeYoloError
from .measure import Size, model_size

IMPORTANCES = ("l1", "bn", "taylor")
ALLOCATIONS = ("uniform", "sensitivity")  # how the budget is spread over layer groups (see allocate.py)
# The most any layer may lose: a layer pruned to nothing would cut the graph.
MAX_LAYER_RATIO = 0.9
SEARCH_ROUNDS = 6  # --target-flops: bisection rounds over the ratio (each prunes a copy)
TRACE_SIZE = 128  # the dependency graph does not depend on the image size: trace a small one


@dataclass
class PruneResult:
    model: nn.Module
    before: Size
    after: Size
    ratio: float  # the channel ratio used (found by the search for --target-flops); sensitivity: uniform's equal
    allocation: dict | None = None  # sensitivity allocation: per group channels, kept width, measured damage


def make_importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "bn":  # network slimming: the BatchNorm scale of each channel
        return tp.importance.BNScaleImportance()
    if name == "taylor":  # first-order Taylor: |weight × gradient|, needs a loss on real data
        return tp.importance.TaylorImportance()
    raise EdgeYoloError(f"--importance must be one of {', '.join(IMPORTANCES)}, not {name!r}")


def _example(model: nn.Module) -> torch.Tensor:
    return torch.zeros(1, 3, TRACE_SIZE, TRACE_SIZE, device=next(model.parameters()).device)


def make_pruner(model: nn.Module, importance: str, ratio: float, *, global_pruning: bool = False,
                round_to: int | None = 8, steps: int = 1):
    """A torch-pruning pruner over ``model``; ``steps`` > 1 reaches ``ratio`` in equal steps."""
    if not 0 < ratio < 1:
        raise EdgeYoloError(f"--ratio must be between 0 and 1, not {ratio}")
    head = list(model.detect.m)
    return _nearest_rounding_pruner_class()(
        model, _example(model), importance=make_importance(importance), global_pruning=global_pruning,
        pruning_ratio=ratio, max_pruning_ratio=MAX_LAYER_RATIO, iterative_steps=steps, ignored_layers=head,
        round_to=round_to or None)


def _nearest_multiple_pruned(n_pruned: int, channels: int, multiple: int) -> int:
    """Channels to remove so that the kept count is the multiple of ``multiple`` nearest the asked one.

    torch-pruning's own ``round_to`` floors the kept count: a 16-channel stem asked to lose 5 %
    (15.2 kept) is cut to 8, half the layer, which alone wipes out a nano model's detections.
    Rounding to the nearest multiple (never below one multiple) keeps the ratio honest."""
    kept = channels - n_pruned
    kept = max(multiple, int(round(kept / multiple)) * multiple)
    return max(channels - kept, 0)


@functools.lru_cache(maxsize=None)
def _nearest_rounding_pruner_class():
    """torch-pruning's pruner with ``_round_to`` replaced (a class made on first use: the import is lazy)."""
    import torch_pruning as tp

    class NearestRoundingPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            return _nearest_multiple_pruned(n_pruned, current_channels, round_to)

    return NearestRoundingPruner


def prune(model: nn.Module, *, ratio: float | None = None, target_gflops: float | None = None,
          importance: str = "l1", global_pruning: bool = False, round_to: int | None = 8,
          loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
          recover: Callable[[nn.Module, int], None] | None = None, iterative: int = 1,
          allocation: str = "uniform", images: Sequence[torch.Tensor] = (),
          progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Prune ``model`` in place: ``ratio`` of each group's channels, or the least ratio whose GFLOPs@640
    are ≤ ``target_gflops`` (found by bisection on copies).

    ``loss_fn(model)`` returns a loss on real data (needed by ``taylor``); with ``iterative`` = K the
    ratio is reached in K equal steps and ``recover(model, step)`` runs between them.
    ``allocation="sensitivity"`` spends the same GFLOPs budget (``ratio``: what the uniform prune at that
    ratio reaches) per group, measured on ``images`` (float NCHW batches in 0..1); see ``allocate``.
    """
    if (ratio is None) == (target_gflops is None):
        raise EdgeYoloError("give exactly one of --ratio and --target-flops")
    if importance == "taylor" and loss_fn is None:
        raise EdgeYoloError("--importance taylor needs --data (gradients on real images)")
    if iterative < 1:
        raise EdgeYoloError(f"--iterative must be at least 1, not {iterative}")
    if allocation not in ALLOCATIONS:
        raise EdgeYoloError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, not {allocation!r}")
    before = model_size(model)
    settings = dict(importance=importance, global_pruning=global_pruning, round_to=round_to, loss_fn=loss_fn)
    if allocation == "sensitivity":
        return _prune_by_sensitivity(model, before, ratio, target_gflops, images, progress, iterative=iterative,
                                     **settings)
    if target_gflops is not None:
        if not 0 < target_gflops < before.gflops:
            raise EdgeYoloError(f"--target-flops must be between 0 and the model's {before.gflops:.2f} GFLOPs")
        ratio = ratio_for_gflops(model, target_gflops, **settings)
    _prune_steps(model, ratio, iterative, recover, **settings)
    return PruneResult(model=model, before=before, after=model_size(model), ratio=ratio)


def _prune_by_sensitivity(model: nn.Module, before: Size, ratio: float | None, target_gflops: float | None,
                          images, progress, *, iterative: int, importance: str, global_pruning: bool,
                          round_to: int | None, loss_fn) -> PruneResult:
    from .allocate import prune_to_widths, sensitivity_widths

    if global_pruning or iterative > 1:
        raise EdgeYoloError("--allocate sensitivity chooses every group's width itself: "
                            "not with --global or --iterative")
    if target_gflops is None:
        if not 0 < ratio < 1:
            raise EdgeYoloError(f"--ratio must be between 0 and 1, not {ratio}")
        target_gflops = model_size(_pruned_copy(model, ratio, importance=importance, global_pruning=False,
                                                round_to=round_to, loss_fn=loss_fn)).gflops
    elif not 0 < target_gflops < before.gflops:
        raise EdgeYoloError(f"--target-flops must be between 0 and the model's {before.gflops:.2f} GFLOPs")
    if importance == "taylor":
        _tracing_mode(model)
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
    try:
        chosen = sensitivity_widths(model, target_gflops, images, importance=make_importance(importance),
                                            round_to=round_to or 1, max_ratio=MAX_LAYER_RATIO, progress=progress)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    prune_to_widths(model, chosen.groups, chosen.widths)
    removed = 1 - sum(chosen.widths.values()) / sum(g.channels for g in chosen.groups)
    return PruneResult(model=model, before=before, after=model_size(model), ratio=ratio if ratio else removed,
                       allocation=chosen.describe())


def ratio_for_gflops(model: nn.Module, target_gflops: float, **settings) -> float:
    """The least ratio (bisection, SEARCH_ROUNDS rounds) whose one-shot pruning meets ``target_gflops``.

    With ``round_to`` a small model's widths move in coarse jumps, so GFLOPs fall in steps and a
    very high ratio can even keep more (groups that would vanish are left whole); the search
    only trusts ratios it has measured."""
    low, high, met = 0.0, MAX_LAYER_RATIO, False
    for _ in range(SEARCH_ROUNDS):
        mid = (low + high) / 2
        if model_size(_pruned_copy(model, mid, **settings)).gflops <= target_gflops:
            high, met = mid, True
        else:
            low = mid
    if not met:
        raise EdgeYoloError(f"--target-flops {target_gflops}: not reached by any ratio up to {MAX_LAYER_RATIO}")
    return high


def _pruned_copy(model: nn.Module, ratio: float, **settings) -> nn.Module:
    clone = copy.deepcopy(model)
    _prune_steps(clone, ratio, 1, None, **settings)
    return clone


def _prune_steps(model: nn.Module, ratio: float, steps: int, recover, *, importance: str, global_pruning: bool,
                 round_to: int | None, loss_fn) -> None:
    _tracing_mode(model)
    try:
        pruner = make_pruner(model, importance, ratio, global_pruning=global_pruning, round_to=round_to, steps=steps)
        for step in range(steps):
            if loss_fn is not None:
                _tracing_mode(model)  # building the pruner's graph leaves the model in eval (decoded head)
                model.zero_grad(set_to_none=True)
                loss_fn(model).backward()
            pruner.step()
            if recover is not None and step + 1 < steps:
                recover(model, step)
                _tracing_mode(model)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _tracing_mode(model: nn.Module) -> None:
    """BatchNorm statistics frozen (eval), the head returning its raw maps (train), gradients on."""
    model.eval()
    model.detect.train()
    for p in model.parameters():
        p.requires_grad_(True)


def taylor_loss_fn(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], hyp: dict, imgsz: int):
    """A ``loss_fn`` for Taylor importance: the YOLOv5 detection loss summed over a few batches."""
    from ..train.loss import YoloLoss

    batches = list(batches)

    def loss_fn(model: nn.Module) -> torch.Tensor:
        criterion = YoloLoss(model, hyp, imgsz=imgsz)
        total = 0.0
        for images, targets in batches:
            total = total + criterion(model(images.float() / 255), targets)[0]
        return total

    return loss_fn


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every convolution, by name (what pruning changed)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
