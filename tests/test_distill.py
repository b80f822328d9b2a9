"""Distillation: the loss falls as a pruned student learns, with or without labels; the CLI runs label-free."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_model
from edgeyolo.optimize.act_swap import swap_activation
from edgeyolo.optimize.distill import (
    DistillLoss,
    NeckTap,
    check_compatible,
    load_teacher,
)
from edgeyolo.optimize.prune import prune

IMGSZ = 128


@pytest.fixture(scope="module")
def teacher(yolov5n_pt):
    return load_teacher(yolov5n_pt, torch.device("cpu"))


@pytest.fixture(scope="module")
def student(yolov5n_pt):
    model = load_model(yolov5n_pt).model
    return swap_activation(prune(model, ratio=0.3).model, "relu")  # narrower and another activation


@pytest.fixture(scope="module")
def batch(coco128):
    from edgeyolo.train.augment import Augmenter
    from edgeyolo.train.data import TrainSet, collate, load_train_data
    from edgeyolo.train.hyp import load_hyp

    train = load_train_data(coco128).train
    samples = TrainSet(train, IMGSZ, Augmenter(load_hyp(None), IMGSZ, "none", seed=0), nc=80)
    images, targets = collate([samples[i] for i in range(4)])
    return images.float() / 255, targets


@pytest.mark.parametrize("with_labels", [True, False])
def test_loss_decreases(teacher, student, batch, with_labels):
    images, targets = batch
    model = copy.deepcopy(student).train()
    loss_fn = DistillLoss(teacher, model)
    s_tap, t_tap = NeckTap(model), NeckTap(teacher)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    with torch.no_grad():
        teacher_maps = teacher(images)
    losses = []
    for _ in range(8):
        loss, parts = loss_fn(model(images), teacher_maps, s_tap.features, t_tap.features,
                              targets if with_labels else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert parts.shape == (4,) and bool(torch.isfinite(parts).all())
    assert losses[-1] < 0.7 * losses[0], losses


def test_identical_models_have_zero_response_loss(teacher, batch):
    images, _ = batch
    twin = copy.deepcopy(teacher)
    loss_fn = DistillLoss(teacher, twin)
    t_tap = NeckTap(teacher)
    with torch.no_grad():
        maps = teacher(images)
        _, parts = loss_fn(maps, maps, t_tap.features, t_tap.features, None)
    assert parts[:3].abs().max() < 1e-5


def test_adapters_start_as_the_least_squares_map(teacher, batch):
    """A twin's features are the teacher's: the fitted adapters are the identity and imitation starts at ~0
    (a random adapter would start it far from 0 and pull a good student's features toward noise)."""
    images, _ = batch
    twin = copy.deepcopy(teacher)
    loss_fn = DistillLoss(teacher, twin)
    t_tap = NeckTap(teacher)
    assert not loss_fn.adapters_fitted
    with torch.no_grad():
        maps = teacher(images)
        mask = loss_fn._mask(maps[0].float(), 0, None, images.shape[0])
        random_start = loss_fn._imitation(loss_fn.adapters[0](t_tap.features[0]), t_tap.features[0], mask)
        _, parts = loss_fn(maps, maps, t_tap.features, t_tap.features, None)
    assert loss_fn.adapters_fitted
    assert float(random_start) > 0.1 and float(parts[3]) < 1e-3 * float(random_start)


def test_label_mask_marks_object_cells(teacher, student):
    loss_fn = DistillLoss(teacher, student)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.2]])
    mask = loss_fn._label_mask(targets, 0, 1, 16, 16)
    assert mask[0, 8, 8] or mask[0, 7, 7]
    assert not mask[0, 0, 0] and mask.sum() < 32


def test_heads_must_match(teacher, yolov5n_pt):
    from edgeyolo.model import build_from_cfg

    other, _ = build_from_cfg("yolov5n", nc=3)
    with pytest.raises(EdgeYoloError, match="heads differ"):
        check_compatible(teacher, other)


def test_label_free_cli_on_a_plain_image_folder(yolov5n_pt, sample_images, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgeyolo.cli import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images:
        shutil.copy(p, folder / p.name)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(yolov5n_pt), "--student", str(yolov5n_pt),
                                      "--data", str(folder), "--no-labels", "--act", "relu", "-o", str(run),
                                      "--epochs", "1", "--imgsz", "96", "--batch", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    from edgeyolo.model.blocks import Conv

    model = load_model(run / "best.safetensors").model
    assert all(type(m.act).__name__ == "ReLU" for m in model.modules() if isinstance(m, Conv))


def test_mismatched_teacher_is_one_line_and_writes_nothing(yolov5n_pt, coco128, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli
    from edgeyolo.model import build_from_cfg, save_model

    other = save_model(build_from_cfg("yolov5n", nc=3)[0], tmp_path / "three.safetensors")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(other), "--student", str(yolov5n_pt),
                                      "--data", str(coco128), "-o", str(run), "--epochs", "1", "--imgsz", "64"])
    assert result.exit_code == 2 and "heads differ" in result.output
    assert not run.exists()
