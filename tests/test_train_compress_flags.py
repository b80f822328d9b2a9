"""edgeyolo train --act / --sparsity: the compression options of the training command, on tiny runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

from edgeyolo.cli import cli

SIZE = 64  # tiny runs: 4 coco128 images at 64 px, one epoch


@pytest.fixture(scope="module")
def four(coco128, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("data") / "four"
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for image in sorted((coco128 / "images").glob("*.jpg"))[:4]:
        (dest / "images" / image.name).symlink_to(image)
        label = coco128 / "labels" / f"{image.stem}.txt"
        if label.exists():
            (dest / "labels" / label.name).symlink_to(label)
    return dest


def _train(weights, data, out, *extra):
    hyp = Path(out).with_suffix(".hyp.yaml")
    hyp.write_text("warmup_epochs: 0\n")  # the one optimiser step runs at lr0 (warm-up would start at 0)
    args = ["train", str(weights), "--data", str(data), "--val-data", str(data), "-o", str(out), "--epochs", "1",
            "--imgsz", str(SIZE), "--batch", "4", "--nominal-batch", "4", "--workers", "0", "--device", "cpu",
            "--augment", "none", "--hyp", str(hyp), *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _bn_l1(model: nn.Module) -> float:
    return float(sum(m.weight.detach().abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)))


def test_act_rebuilds_the_model_before_training(yolov5n_pt, four, tmp_path):
    from edgeyolo.model import load_model

    result = _train(yolov5n_pt, four, tmp_path / "relu", "--act", "relu")
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "relu" / "last.safetensors").model
    acts = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU))}
    assert acts == {"ReLU"}
    bad = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(four), "-o", str(tmp_path / "x"),
                                   "--act", "gelu"])
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()


def test_sparsity_pulls_batchnorm_scales_down(yolov5n_pt, four, tmp_path):
    """Same seed, same data, same steps: only the L1 term differs, so the scales' L1 must be lower."""
    from edgeyolo.model import load_model

    plain = _train(yolov5n_pt, four, tmp_path / "plain", "--lr0", "0.01")
    sparse = _train(yolov5n_pt, four, tmp_path / "sparse", "--lr0", "0.01", "--sparsity", "0.5")
    assert plain.exit_code == 0 and sparse.exit_code == 0, plain.output + sparse.output
    before = _bn_l1(load_model(yolov5n_pt).model)
    after_plain = _bn_l1(load_model(tmp_path / "plain" / "last.safetensors").model)
    after_sparse = _bn_l1(load_model(tmp_path / "sparse" / "last.safetensors").model)
    assert after_sparse < after_plain < before + 1.0
    bad = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(four), "-o", str(tmp_path / "y"),
                                   "--sparsity", "-1"])
    assert bad.exit_code == 2
