"""Structured pruning: channels really go, the model still runs, exports and round-trips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_model, load_native, save_model
from edgeyolo.optimize.measure import model_size
from edgeyolo.optimize.prune import channel_widths, prune
from edgeyolo.optimize.zeroing import sparsity, zero_smallest


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_model(yolov5n_pt).model


@pytest.fixture(scope="module")
def pruned(yolov5n):
    return prune(copy.deepcopy(yolov5n), ratio=0.3)


def test_params_and_gflops_fall(pruned, yolov5n):
    assert pruned.before == model_size(yolov5n)
    assert pruned.after.params < 0.7 * pruned.before.params
    assert pruned.after.gflops < 0.7 * pruned.before.gflops
    widths, original = channel_widths(pruned.model), channel_widths(yolov5n)
    assert any(widths[k] < original[k] for k in widths)


def test_head_outputs_kept_and_widths_rounded(pruned, yolov5n):
    model = pruned.model
    assert [m.out_channels for m in model.detect.m] == [m.out_channels for m in yolov5n.detect.m]
    head = {f"model.{len(model.model) - 1}.m.{i}" for i in range(3)}
    assert all(w % 8 == 0 for k, w in channel_widths(model).items() if k not in head)


def test_forward_shapes_and_bottleneck_shortcuts(pruned, yolov5n):
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        assert pruned.model(x).shape == yolov5n(x).shape == (1, 3 * (16 * 20 + 8 * 10 + 4 * 5), 85)
    c3 = pruned.model.model[2]  # residual bottlenecks keep equal in/out widths (the graph coupled them)
    assert all(b.add and b.cv1.conv.in_channels == b.cv2.conv.out_channels for b in c3.m)


def test_round_trip_through_save_model(pruned, tmp_path):
    path = save_model(pruned.model, tmp_path / "pruned.safetensors")
    back = load_native(path).model
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned.model(x))
    assert channel_widths(back) == channel_widths(pruned.model)


def test_onnx_export_runs_in_onnxruntime(pruned, tmp_path):
    import onnxruntime as ort

    from edgeyolo.export import ExportOptions, export_onnx

    model = copy.deepcopy(pruned.model)
    path = export_onnx(model, tmp_path / "pruned.onnx", ExportOptions(imgsz=(128, 128)))
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = pruned.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2)


def test_bn_importance_and_global_prune(yolov5n):
    result = prune(copy.deepcopy(yolov5n), ratio=0.2, importance="bn", global_pruning=True)
    assert result.after.params < result.before.params


def test_bad_requests_are_one_line_errors(yolov5n):
    with pytest.raises(EdgeYoloError, match="exactly one"):
        prune(copy.deepcopy(yolov5n))
    with pytest.raises(EdgeYoloError, match="taylor needs --data"):
        prune(copy.deepcopy(yolov5n), ratio=0.2, importance="taylor")
    with pytest.raises(EdgeYoloError, match="target-flops"):
        prune(copy.deepcopy(yolov5n), target_gflops=99.0)


def test_zeroing_zeroes_without_removing(yolov5n):
    model = zero_smallest(copy.deepcopy(yolov5n), 0.3)
    assert sparsity(model) == pytest.approx(0.3, abs=0.01)
    assert model_size(model) == model_size(yolov5n)  # same shapes: dense kernels do the same work
    assert sparsity(yolov5n) < 0.01
    assert all(isinstance(m.weight, nn.Parameter) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_prune_cli_writes_a_checkpoint(yolov5n_pt, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    out = tmp_path / "p.safetensors"
    result = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "0.2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "GFLOPs@640 4.52 ->" in result.output
    assert model_size(load_model(out).model).params < 1.8e6
    bad = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "1.5", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output


def test_sparsity_penalty_pulls_bn_scales_towards_zero(yolov5n):
    from edgeyolo.optimize.sparsity import add_bn_l1_grad, bn_l1

    model = copy.deepcopy(yolov5n)
    optimizer = torch.optim.SGD([m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)], lr=1e-3)
    before = bn_l1(model)
    for _ in range(3):
        optimizer.zero_grad()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.grad = torch.zeros_like(m.weight)
        add_bn_l1_grad(model, 1.0)
        optimizer.step()
    assert bn_l1(model) < before - 1e-3 * 3 * 0.9 * sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_rounding_keeps_the_nearest_multiple_not_the_floor(yolov5n):
    from edgeyolo.optimize.prune import _nearest_multiple_pruned

    assert _nearest_multiple_pruned(1, 16, 8) == 0  # 15 kept rounds to 16, not to 8 (torch-pruning's floor)
    assert _nearest_multiple_pruned(5, 32, 8) == 8  # 27 kept -> 24
    assert _nearest_multiple_pruned(15, 16, 8) == 8  # never below one multiple
    small = prune(copy.deepcopy(yolov5n), ratio=0.05).model
    assert small.model[0].conv.out_channels == 16  # the stem keeps its 16 channels at 5 %


def _best_score(model, image) -> float:
    from edgeyolo.runtime.preprocess import LetterboxSettings, letterbox, to_input

    x = torch.from_numpy(to_input(letterbox(image, LetterboxSettings(imgsz=(320, 320)))[0]))
    with torch.no_grad():
        y = model.eval()(x)[0]
    return float((y[:, 4:5] * y[:, 5:]).max())


def test_batchnorm_recalibration_recovers_what_one_shot_pruning_shifted(yolov5n, coco128, images):
    """Pruned channels still emitted act(beta); without them the next BatchNorm's stored mean is
    wrong. Re-estimating the statistics on 16 unlabelled images brings the detections back."""
    from edgeyolo.calibration import load_calibration
    from edgeyolo.optimize.batchnorm import letterboxed_batches, recalibrate_batchnorm
    from edgeyolo.runtime.preprocess import LetterboxSettings

    model = prune(copy.deepcopy(yolov5n), ratio=0.1).model
    bus = images[0]
    before, original = _best_score(model, bus), _best_score(yolov5n, bus)
    calib = load_calibration(coco128 / "images", LetterboxSettings(imgsz=(320, 320)), size=16)
    assert recalibrate_batchnorm(model, letterboxed_batches(calib.letterboxed)) == 16
    after = _best_score(model, bus)
    assert after > before + 0.3, (before, after, original)
    assert not model.training


def test_taylor_importance_from_the_cli(yolov5n_pt, coco128, tmp_path):
    """Taylor needs the loss on raw head maps; building the pruner's graph had left the head decoding."""
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    out = tmp_path / "t.safetensors"
    result = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "0.2", "--importance", "taylor",
                                      "--data", str(coco128), "--imgsz", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert model_size(load_model(out).model).gflops < 4.0


def test_removing_channels_equals_zeroing_their_outputs(yolov5n):
    """The dependency graph is right: the pruned model computes exactly what the original computes with
    those channels' outputs forced to zero (BatchNorm scale and shift zeroed, SiLU(0) = 0). So what
    one-shot pruning loses is the channels' information, not a wiring mistake."""
    import torch_pruning as tp

    from edgeyolo.optimize.prune import _tracing_mode, make_pruner

    model = copy.deepcopy(yolov5n)
    _tracing_mode(model)
    names = {module: name for name, module in model.named_modules()}
    removed: dict[str, set[int]] = {}
    for group in make_pruner(model, "l1", 0.2).step(interactive=True):
        for dep, idxs in group:
            if dep.handler == tp.prune_conv_out_channels:
                removed.setdefault(names[dep.target.module], set()).update(int(i) for i in idxs)
        group.prune()
    assert removed
    zeroed = copy.deepcopy(yolov5n)
    blocks = dict(zeroed.named_modules())
    with torch.no_grad():
        for name, idxs in removed.items():
            bn = blocks[name.rsplit(".", 1)[0]].bn
            index = torch.tensor(sorted(idxs), dtype=torch.long)
            bn.weight[index] = 0
            bn.bias[index] = 0
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    model.eval(), zeroed.eval(), yolov5n.eval()
    with torch.no_grad():
        pruned_out, zeroed_out, original_out = model(x), zeroed(x), yolov5n(x)
    assert torch.allclose(pruned_out, zeroed_out, atol=1e-3)
    assert not torch.allclose(pruned_out, original_out, atol=1e-1)  # and the comparison can fail


def test_batchnorm_recalibration_measures_the_whole_set_not_an_average_of_batches(yolov5n):
    """The first BatchNorm's input is the stem convolution of the images themselves: its new
    statistics must be the mean and variance over every pixel of every image. An average of
    per-batch variances (torch's cumulative momentum) leaves out how the batch means differ."""
    from edgeyolo.optimize.batchnorm import recalibrate_batchnorm

    model = copy.deepcopy(yolov5n)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 64, 64, generator=generator) * (0.2 + 0.6 * i) for i in range(3)]
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        stem = torch.cat([yolov5n.model[0].conv(b) for b in batches]).transpose(0, 1).reshape(16, -1).double()
    bn = model.model[0].bn
    torch.testing.assert_close(bn.running_mean.double(), stem.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), stem.var(1), rtol=1e-4, atol=1e-5)
    assert not model.training
