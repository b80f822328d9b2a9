"""Least-squares reconstruction after pruning: the fit is wired right and brings a pruned model back."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_model
from edgeyolo.optimize.prune import prune
from edgeyolo.optimize.reconstruct import kept_channels, reconstruct

SIZE = 160


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_model(yolov5n_pt).model.float().eval()


@pytest.fixture(scope="module")
def batches(coco128):
    """Two disjoint sets of coco128 images: 8 to fit on, 8 to check on."""
    from edgeyolo.calibration import load_calibration
    from edgeyolo.optimize.batchnorm import letterboxed_batches
    from edgeyolo.runtime.preprocess import LetterboxSettings

    calib = load_calibration(coco128 / "images", LetterboxSettings(imgsz=(SIZE, SIZE)), size=16)
    fit, check = calib.letterboxed[:8], calib.letterboxed[8:]
    return list(letterboxed_batches(fit, 4)), torch.cat(list(letterboxed_batches(check, 8)))


def _head_error(model, teacher, x) -> float:
    """Mean squared difference of the raw head maps (logits), relative to the teacher's."""
    model.eval().detect.train()
    teacher.eval().detect.train()
    with torch.no_grad():
        ours, reference = model(x), teacher(x)
    model.eval()
    teacher.eval()
    return float(sum(((a - b) ** 2).sum() for a, b in zip(ours, reference)) / sum((b ** 2).sum() for b in reference))


def test_an_unpruned_copy_fits_itself(yolov5n, batches):
    """Every layer's exact solution is the layer itself: the fit must give back the same function
    (the im2col positions, teacher targets and the BatchNorm write-back line up)."""
    fit, check = batches
    student = copy.deepcopy(yolov5n)
    layers = len(kept_channels(student, yolov5n))
    report = reconstruct(student, yolov5n, fit, positions_per_image=256)
    assert report.layers == layers == 60
    assert max(after for _, after in report.errors.values()) < 1e-3
    assert _head_error(student, yolov5n, check) < 1e-4


def test_a_pruned_model_comes_back_closer_than_batchnorm_alone(yolov5n, batches):
    from edgeyolo.optimize.batchnorm import recalibrate_batchnorm

    fit, check = batches
    pruned = prune(copy.deepcopy(yolov5n), ratio=0.2).model
    recalibrated = copy.deepcopy(pruned)
    recalibrate_batchnorm(recalibrated, fit)
    report = reconstruct(pruned, yolov5n, fit, positions_per_image=256)
    assert all(after <= before + 1e-9 for before, after in report.errors.values())
    # on images the fit never saw: clearly less error than BatchNorm re-estimation alone
    assert _head_error(pruned, yolov5n, check) < 0.8 * _head_error(recalibrated, yolov5n, check)
    # and it still trains like any model: its BatchNorm statistics are real ones, so train mode (batch
    # statistics) moves its outputs no more than it moves the original model's
    assert _train_eval_gap(pruned, check) < 1.5 * _train_eval_gap(copy.deepcopy(yolov5n), check)


def _train_eval_gap(model, x) -> float:
    """Mean |raw head maps in train mode − in eval mode| (batch vs running BatchNorm statistics)."""
    model.train()
    with torch.no_grad():
        batch_stats = model(x)
    model.eval().detect.train()
    with torch.no_grad():
        running_stats = model(x)
    model.eval()
    return float(sum((a - b).abs().mean() for a, b in zip(batch_stats, running_stats)))

def test_only_a_model_pruned_from_the_teacher_can_be_reconstructed(yolov5n, batches):
    other = copy.deepcopy(yolov5n)
    with torch.no_grad():
        other.model[2].cv1.bn.weight.add_(0.01)  # as after training: its channels no longer match
    with pytest.raises(EdgeYoloError, match="freshly pruned"):
        reconstruct(other, yolov5n, batches[0])
    with pytest.raises(EdgeYoloError, match="calibration images"):
        reconstruct(copy.deepcopy(yolov5n), yolov5n, [])


def test_prune_cli_reconstructs(yolov5n_pt, coco128, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli
    from edgeyolo.model import load_native

    out = tmp_path / "r.safetensors"
    bad = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "0.2", "--reconstruct", "-o", str(out)])
    assert bad.exit_code == 2 and "--reconstruct needs --calib" in bad.output and not out.exists()
    result = CliRunner().invoke(cli, ["prune", str(yolov5n_pt), "--ratio", "0.2", "--reconstruct", "--calib",
                                      str(coco128 / "images"), "--calib-size", "8", "--imgsz", "96", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 layers re-fit" in result.output
    meta = load_native(out).description["meta"]
    assert meta["reconstruction"]["images"] == 8 and meta["batchnorm_recalibrated_on"] == 0
