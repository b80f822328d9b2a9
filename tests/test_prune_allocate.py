"""Sensitivity-guided pruning: each group's damage measured alone, the budget spent where it hurts least."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from edgeyolo.model import load_model
from edgeyolo.optimize import allocate
from edgeyolo.optimize.allocate import (
    Group,
    greedy_order,
    measure_sensitivity,
    prunable_groups,
)
from edgeyolo.optimize.measure import model_size
from edgeyolo.optimize.prune import make_importance


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_model(yolov5n_pt).model


@pytest.fixture(scope="module")
def tiny_images(coco128):
    """Two coco128 images letterboxed to 96²: enough to tell a harmless cut from a harmful one."""
    from edgeyolo.calibration import load_calibration
    from edgeyolo.optimize.batchnorm import letterboxed_batches
    from edgeyolo.runtime.preprocess import LetterboxSettings

    calib = load_calibration(coco128 / "images", LetterboxSettings(imgsz=(96, 96)), size=2)
    return list(letterboxed_batches(calib.letterboxed))


def test_greedy_order_takes_from_the_cheap_group_first():
    """Damage per GFLOP decides: the wide, insensitive group gives its channels before the fragile one."""
    groups = [Group("fragile", 32, tuple(range(32)), (), 0.01), Group("cheap", 32, tuple(range(32)), (), 0.01)]
    damage = {"fragile": {32: 0.0, 24: 1.0, 16: 3.0, 8: 9.0}, "cheap": {32: 0.0, 24: 0.01, 16: 0.02, 8: 5.0}}
    moves = greedy_order(groups, damage, round_to=8)
    assert moves[:2] == [("cheap", 24), ("cheap", 16)]
    assert moves[2] == ("fragile", 24)  # 1.0 added beats cheap's jump to 8 (4.98)
    assert {name for name, _ in moves} == {"fragile", "cheap"} and len(moves) == 6


def test_measured_damage_finds_the_harmless_group(yolov5n, l1_groups, tiny_images):
    """Half of one group's channels silenced beforehand (BatchNorm scale and shift zero): pruning them
    costs nothing, so the measure ranks that group below an untouched one of the same width, and the
    greedy allocation spends its first moves there."""
    groups = {g.name: g for g in l1_groups}
    silent, other = groups["model.13.m.0.cv1.conv"], groups["model.20.m.0.cv1.conv"]
    quiet = [i for i in range(silent.channels) if i % 2]  # half the channels, spread over the layer
    model = allocate.masked_copy(yolov5n, dataclasses.replace(silent, order=tuple(quiet)), len(quiet))
    silent = dataclasses.replace(silent, order=tuple(quiet) + tuple(i for i in silent.order if i not in quiet))
    chosen = [silent, other]
    damage = measure_sensitivity(model, chosen, tiny_images, round_to=8, max_ratio=0.9)
    assert set(damage[silent.name]) == {64, 48, 32, 16}  # full width + the 25/50/75 % levels
    assert damage[silent.name][32] < 0.05 * damage[other.name][32], damage
    assert damage[silent.name][16] > damage[silent.name][32]  # beyond the silent half it costs again
    moves = greedy_order(chosen, damage, round_to=8)
    assert moves[:2] == [(silent.name, 56), (silent.name, 48)]


def test_sensitivity_prune_from_the_cli_meets_the_budget_and_records_widths(yolov5n_pt, coco128, tmp_path,
                                                                         monkeypatch):
    """The CLI path end to end, on tiny inputs: the budget met, widths multiples of --round-to, the choice
    in the checkpoint's description, and the result loads and exports."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from edgeyolo.cli import cli
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.optimize.prune import channel_widths

    monkeypatch.setattr(allocate, "LEVELS", (0.5,))  # one measured width per group: the test's time
    out = tmp_path / "s.safetensors"
    result = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--target-flops", "3.6", "--allocate", "sensitivity",
                                      "--calib", str(coco128 / "images"), "--calib-size", "2", "--imgsz", "64",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    assert model_size(loaded.model).gflops <= 3.6
    meta = loaded.description["meta"]
    assert meta["allocation"] == "sensitivity" and meta["batchnorm_recalibrated_on"] == 2
    widths = channel_widths(loaded.model)
    kept = {name: g["kept"] for name, g in meta["groups"].items()}
    assert all(widths[name] == k for name, k in kept.items())
    assert all(k % 8 == 0 for k in kept.values())
    assert any(g["kept"] < g["channels"] for g in meta["groups"].values())
    assert any(g["kept"] == g["channels"] for g in meta["groups"].values())  # not uniform: some groups spared
    path = export_onnx(copy.deepcopy(loaded.model), tmp_path / "s.onnx", ExportOptions(imgsz=(96, 96)))
    x = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = loaded.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], want, rtol=1e-3, atol=1e-2)


def test_sensitivity_needs_images_and_excludes_global(yolov5n_pt, yolov5n, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli
    from edgeyolo.errors import EdgeYoloError
    from edgeyolo.optimize.prune import prune

    bad = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "0.2", "--allocate", "sensitivity",
                                   "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--calib" in bad.output
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(EdgeYoloError, match="--global"):
        prune(copy.deepcopy(yolov5n), ratio=0.2, allocation="sensitivity", global_pruning=True,
              images=[torch.zeros(1, 3, 64, 64)])


@pytest.fixture(scope="module")
def l1_groups(yolov5n):
    return prunable_groups(yolov5n, make_importance("l1"))


def test_masking_a_group_equals_pruning_it(yolov5n, l1_groups):
    """What the damage is measured on (channels masked) is what pruning computes (channels removed)."""
    groups = l1_groups
    group = next(g for g in groups if g.name == "model.6.m.1.cv1.conv")
    masked = allocate.masked_copy(yolov5n, group, 16)
    pruned = copy.deepcopy(yolov5n)
    allocate.prune_to_widths(pruned, groups, {group.name: group.channels - 16})
    assert dict(pruned.named_modules())[group.name].out_channels == group.channels - 16
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked.eval()(x), atol=1e-3, rtol=1e-3)
        assert not torch.allclose(masked(x), yolov5n.eval()(x), atol=1e-2)
    assert isinstance(dict(pruned.named_modules())[group.name], nn.Conv2d)


def test_gflops_estimated_from_widths_match_the_pruned_model(yolov5n, l1_groups):
    """The allocation's search counts GFLOPs from the widths alone (concatenations included); a real
    prune to the same widths confirms it."""
    widths = {g.name: g.channels // 2 for g in l1_groups[::3]}  # every third group halved, concat inputs among them
    costs = allocate.conv_costs(yolov5n)
    full = model_size(yolov5n).gflops
    other = full - allocate.estimated_gflops(costs, l1_groups, {})
    assert 0 <= other < 0.02 * full  # convolutions are the cost
    pruned = copy.deepcopy(yolov5n)
    allocate.prune_to_widths(pruned, l1_groups, widths)
    estimate = allocate.estimated_gflops(costs, l1_groups, widths) + other
    assert estimate == pytest.approx(model_size(pruned).gflops, rel=0.01)
    assert estimate < 0.9 * full
