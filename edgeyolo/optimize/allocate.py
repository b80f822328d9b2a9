"""Sensitivity-guided widths: spend a GFLOPs budget on the layer groups where pruning hurts least.

Uniform pruning takes the same fraction from every coupled group (a C3's residual chain, a
concatenation's inputs, one plain conv). On yolov5n some groups lose a quarter of their channels
for a fraction of a point while others cannot spare a few, and uniform cuts add those losses up.
Here each group is measured alone: its least important channels are *masked* (BatchNorm scale and
shift zeroed, which computes exactly what removing them computes — tests/test_prune.py), the
BatchNorm statistics are re-estimated as after a real prune, and the damage is the
objectness-weighted error of the head against the unpruned model on a few unlabelled images
(``edgeyolo.sensitivity.weighted_error``: cells holding objects count, background does not).
Widths are then lowered greedily, ``round_to`` channels at a time, in the group with the least
added damage per FLOP saved; the shortest prefix of that order whose real pruned model meets the
budget is kept (bisection over copies, as ``--target-flops`` does for the uniform ratio).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EdgeYoloError
from .measure import model_size

LEVELS = (0.25, 0.5, 0.75)  # fractions of a group's channels whose damage is measured (between: interpolated)
SENSITIVITY_IMAGES = 32  # unlabelled images the damage is measured on


@dataclass(frozen=True)
class Group:
    """One coupled set of channels, named by its root convolution."""
    name: str
    channels: int
    order: tuple[int, ...]  # channel indices (root numbering), least important first
    masks: tuple[tuple[str, tuple[int, ...]], ...]  # (BatchNorm name, its index of each root channel)
    gflops_per_channel: float  # GFLOPs@640 one removed channel saves (at full widths: an estimate)
    touches: tuple[tuple[str, str], ...] = ()  # (convolution name, "out" or "in"): where its channels live


@dataclass
class Allocation:
    groups: list[Group]
    damage: dict[str, dict[int, float]]  # group → {kept width: damage measured with only it pruned}
    widths: dict[str, int]  # group → kept width chosen

    def describe(self) -> dict:
        """The choice, for the checkpoint description: per group channels, kept, and the damage curve."""
        return {g.name: {"channels": g.channels, "kept": self.widths[g.name],
                         "damage": {str(k): float(f"{v:.4g}") for k, v in sorted(self.damage[g.name].items())}}
                for g in self.groups}


def prunable_groups(model: nn.Module, importance) -> list[Group]:
    """Every group torch-pruning's dependency graph couples (the Detect convolutions' outputs excluded)."""
    import torch_pruning as tp

    from .prune import _example, _tracing_mode

    work = copy.deepcopy(model)
    _tracing_mode(work)
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=_example(work))
    names = {module: name for name, module in work.named_modules()}
    areas = _output_areas(work)
    groups = []
    with torch.no_grad():
        for group in graph.get_all_groups(ignored_layers=list(work.detect.m.modules()), root_module_types=[nn.Conv2d]):
            root = group[0].dep.target.module
            masks, macs, touches = [], 0.0, []
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                if handler == tp.prune_batchnorm_out_channels:
                    by_root = dict(zip(item.root_idxs, item.idxs))
                    masks.append((names[module], tuple(by_root[i] for i in range(root.out_channels))))
                elif handler == tp.prune_conv_out_channels:
                    macs += module.in_channels // module.groups * _kernel(module) * areas[module]
                    touches.append((names[module], "out"))
                elif handler == tp.prune_conv_in_channels:
                    macs += module.out_channels // module.groups * _kernel(module) * areas[module]
                    touches.append((names[module], "in"))
            scores = importance(group)
            order = tuple(int(i) for i in torch.argsort(scores.float().cpu(), stable=True))
            groups.append(Group(names[root], root.out_channels, order, tuple(masks), 2 * macs / 1e9, tuple(touches)))
    return groups


def conv_costs(model: nn.Module) -> dict[str, tuple[int, int, float]]:
    """Every convolution's (out channels, in channels, GFLOPs@640 per out × in channel pair)."""
    areas = _output_areas(model)
    names = {module: name for name, module in model.named_modules()}
    return {names[m]: (m.out_channels, m.in_channels, 2 * _kernel(m) * area / m.groups / 1e9)
            for m, area in areas.items()}


def estimated_gflops(costs: dict[str, tuple[int, int, float]], groups: Sequence[Group],
                     widths: dict[str, int]) -> float:
    """Convolution GFLOPs@640 once ``groups`` are cut to ``widths``, counted from the shapes alone
    (milliseconds, where a real prune takes seconds); a concatenation's input adds up its groups' cuts."""
    cut = {name: [0, 0] for name in costs}
    for group in groups:
        removed = group.channels - widths.get(group.name, group.channels)
        for conv, side in group.touches:
            cut[conv][side == "in"] += removed
    return sum((out - cut[name][0]) * (inp - cut[name][1]) * unit for name, (out, inp, unit) in costs.items())


def _kernel(conv: nn.Conv2d) -> int:
    return int(np.prod(conv.kernel_size))


AREA_SIZE = 160  # conv output areas scale with the image area: measured small, scaled to 640


def _output_areas(model: nn.Module) -> dict[nn.Module, float]:
    """Output height × width of every convolution for one 640² image."""
    areas, hooks = {}, []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, _, out: areas.__setitem__(m, out.shape[-2] * out.shape[-1] * (640 / AREA_SIZE) ** 2)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, AREA_SIZE, AREA_SIZE, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return areas


def masked_copy(model: nn.Module, group: Group, count: int) -> nn.Module:
    """A copy of ``model`` whose ``count`` least important channels of ``group`` output zero."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    chosen = group.order[:count]
    with torch.no_grad():
        for bn_name, index in group.masks:
            idx = torch.tensor([index[i] for i in chosen], dtype=torch.long)
            modules[bn_name].weight[idx] = 0
            modules[bn_name].bias[idx] = 0
    return clone


def candidate_widths(channels: int, round_to: int, max_ratio: float) -> list[int]:
    """Kept widths measured for a group: LEVELS of its channels, rounded to ``round_to``, widest first."""
    floor = max(round_to, math.ceil(channels * (1 - max_ratio)))
    widths = {max(floor, int(round(channels * (1 - level) / round_to)) * round_to) for level in LEVELS}
    return sorted((w for w in widths if w < channels), reverse=True)


def measure_sensitivity(model: nn.Module, groups: Sequence[Group], images: Sequence[torch.Tensor], *,
                        round_to: int, max_ratio: float,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, dict[int, float]]:
    """Damage of each group pruned alone to each candidate width: ``{group: {kept: damage}}``.

    Every candidate has its BatchNorm statistics re-estimated on ``images``, as a pruned model does, and
    is compared with the unpruned model re-estimated the same way: on a few dozen images that
    re-estimation alone moves the head more than a harmless cut does, and would drown the ranking."""
    from ..model import HEAD_SIGMOID
    from ..sensitivity import weighted_error
    from .batchnorm import recalibrate_batchnorm

    def outputs(m: nn.Module) -> list[np.ndarray]:
        m.eval()
        mode, m.head_mode = m.head_mode, HEAD_SIGMOID
        try:
            with torch.no_grad():
                return [m(x).numpy() for x in images]
        finally:
            m.head_mode = mode

    def damage(m: nn.Module) -> float:
        recalibrate_batchnorm(m, images)
        return float(np.mean([weighted_error(r, o) for r, o in zip(reference, outputs(m))]))

    unpruned = copy.deepcopy(model)
    recalibrate_batchnorm(unpruned, images)
    reference = outputs(unpruned)
    plan = [(g, kept) for g in groups for kept in candidate_widths(g.channels, round_to, max_ratio)]
    found = {g.name: {g.channels: 0.0} for g in groups}
    for done, (group, kept) in enumerate(plan, 1):
        found[group.name][kept] = damage(masked_copy(model, group, group.channels - kept))
        if progress is not None:
            progress(done, len(plan))
    return found


def _interpolated(curve: dict[int, float], kept: int) -> float:
    widths = sorted(curve)
    return float(np.interp(kept, widths, [curve[w] for w in widths]))


def greedy_order(groups: Sequence[Group], sensitivity: dict[str, dict[int, float]],
                 round_to: int) -> list[tuple[str, int]]:
    """Width reductions, cheapest damage per GFLOP first: ``(group, new kept width)`` moves, down to
    each group's narrowest measured width (never extrapolated)."""
    kept = {g.name: g.channels for g in groups}
    by_name = {g.name: g for g in groups}
    moves = []
    while True:
        best, best_score = None, math.inf
        for name, curve in sensitivity.items():
            low = min(curve)
            if kept[name] <= low:
                continue
            new = max(low, (kept[name] - 1) // round_to * round_to)
            added = max(0.0, _interpolated(curve, new) - _interpolated(curve, kept[name]))
            saved = (kept[name] - new) * by_name[name].gflops_per_channel
            score = added / max(saved, 1e-12)
            if score < best_score:
                best, best_score = (name, new), score
        if best is None:
            return moves
        kept[best[0]] = best[1]
        moves.append(best)


def widths_after(groups: Sequence[Group], moves: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Kept width of every group once ``moves`` are applied."""
    widths = {g.name: g.channels for g in groups}
    widths.update(dict(moves))
    return widths


def prune_to_widths(model: nn.Module, groups: Sequence[Group], widths: dict[str, int]) -> None:
    """Remove, in place, each group's least important channels down to ``widths[group]``."""
    import torch_pruning as tp

    from .prune import _example, _tracing_mode

    by_name = {g.name: g for g in groups}
    _tracing_mode(model)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=_example(model))
        names = {module: name for name, module in model.named_modules()}
        for group in list(graph.get_all_groups(ignored_layers=list(model.detect.m.modules()),
                                               root_module_types=[nn.Conv2d])):
            root = group[0].dep.target.module
            spec = by_name.get(names[root])
            if spec is None or widths.get(spec.name, spec.channels) >= spec.channels:
                continue
            group.prune(idxs=list(spec.order[:spec.channels - widths[spec.name]]))
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def sensitivity_widths(model: nn.Module, target_gflops: float, images: Sequence[torch.Tensor], *,
                       importance, round_to: int, max_ratio: float,
                       progress: Callable[[int, int], None] | None = None) -> Allocation:
    """Groups, their measured damage and kept widths: the shortest greedy prefix whose pruned copy is
    ≤ ``target_gflops``."""
    if not images:
        raise EdgeYoloError("sensitivity allocation needs calibration images (--calib)")
    groups = prunable_groups(model, importance)
    sensitivity = measure_sensitivity(model, groups, images, round_to=round_to, max_ratio=max_ratio,
                                      progress=progress)
    moves = greedy_order(groups, sensitivity, round_to)

    def gflops(count: int) -> float:
        clone = copy.deepcopy(model)
        prune_to_widths(clone, groups, widths_after(groups, moves[:count]))
        return model_size(clone).gflops

    costs = conv_costs(model)
    other = model_size(model).gflops - estimated_gflops(costs, groups, {})  # what is not a convolution

    def estimate(count: int) -> float:
        return estimated_gflops(costs, groups, widths_after(groups, moves[:count])) + other

    low, high = 0, len(moves)
    while low < high:  # least prefix whose estimate meets the budget (GFLOPs fall with every move)
        mid = (low + high) // 2
        if estimate(mid) <= target_gflops:
            high = mid
        else:
            low = mid + 1
    while gflops(high) > target_gflops:  # the real count decides; the estimate only saves prunes
        if high == len(moves):
            raise EdgeYoloError(f"--target-flops {target_gflops}: not reached even at every group's narrowest "
                                f"measured width ({max(LEVELS):.0%} pruned)")
        high += 1
    return Allocation(groups, sensitivity, widths_after(groups, moves[:high]))
