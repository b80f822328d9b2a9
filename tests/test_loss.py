"""YOLOv5's loss reproduced: upstream's numbers on a fixed batch, and each option's expected effect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeyolo.train.hyp import DEFAULT_HYP
from edgeyolo.train.loss import YoloLoss, bbox_iou


@pytest.fixture(scope="module")
def upstream_batch(expected_dir, yolov5n_pt):
    """yolov5n with BatchNorm on running stats and the head in training mode, plus the fixed batch."""
    from edgeyolo.model import load_model

    model = load_model(yolov5n_pt).model
    model.eval()
    model.detect.train()
    data = np.load(expected_dir / "loss_batch_yolov5n.npz")
    expected = json.loads((expected_dir / "loss_yolov5n_upstream.json").read_text())
    images = torch.from_numpy(data["images"]).float() / 255
    return model, images, torch.from_numpy(data["targets"]), expected


def test_reproduces_upstream_loss_and_gradients(upstream_batch):
    model, images, targets, expected = upstream_batch
    model.zero_grad()
    loss, parts = YoloLoss(model, DEFAULT_HYP)(model(images), targets)
    loss.backward()
    for got, key in zip(parts.tolist(), ("lbox", "lobj", "lcls")):
        assert got == pytest.approx(expected[key], rel=1e-5), key
    assert loss.item() == pytest.approx(expected["loss_total"], rel=1e-5)
    grads = {
        "model.0.conv.weight": model.model[0].conv.weight.grad,
        "model.24.m.0.weight (Detect, P3)": model.model[24].m[0].weight.grad,
    }
    assert set(grads) == set(expected["grad_l2"])
    for name, grad in grads.items():
        assert grad.norm().item() == pytest.approx(expected["grad_l2"][name], rel=1e-4), name


@pytest.fixture(scope="module")
def raw_preds(upstream_batch):
    model, images, targets, _ = upstream_batch
    with torch.no_grad():
        return [p.detach() for p in model(images[:2])], targets[targets[:, 0] < 2], model


def _parts(model, preds, targets, **hyp):
    return YoloLoss(model, {**DEFAULT_HYP, **hyp})(preds, targets)[1]


def test_empty_targets_give_only_objectness(raw_preds):
    preds, _, model = raw_preds
    lbox, lobj, lcls = _parts(model, preds, torch.zeros(0, 6)).tolist()
    assert lbox == 0.0 and lcls == 0.0 and lobj > 0.0


def test_label_smoothing_raises_class_loss_of_confident_predictions(raw_preds):
    preds, targets, model = raw_preds
    plain = _parts(model, preds, targets)
    smooth = _parts(model, preds, targets, label_smoothing=0.1)
    assert smooth[2] != plain[2]
    assert torch.equal(smooth[:2], plain[:2])  # only the class targets change


def test_focal_loss_down_weights_easy_examples(raw_preds):
    preds, targets, model = raw_preds
    plain = _parts(model, preds, targets)
    focal = _parts(model, preds, targets, fl_gamma=1.5)
    assert focal[1] < plain[1] and focal[2] < plain[2]
    assert focal[0] == plain[0]  # the box loss is not a BCE


@pytest.mark.parametrize("kind", ["giou", "diou"])
def test_iou_kinds_change_only_the_box_loss(raw_preds, kind):
    preds, targets, model = raw_preds
    ciou = _parts(model, preds, targets)
    other = _parts(model, preds, targets, iou_type=kind)
    assert other[0] != ciou[0]
    assert other[0] > 0


def test_bbox_iou_variants_on_known_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 2.0, 2.0]])  # shifted by half a width: IoU 2/6
    iou = bbox_iou(a, b).item()
    assert iou == pytest.approx(1 / 3, rel=1e-5)
    assert bbox_iou(a, b, "giou").item() == pytest.approx(iou, rel=1e-5)  # enclosing box = union
    # DIoU: centre distance 1, enclosing diagonal^2 = 3^2 + 2^2
    assert bbox_iou(a, b, "diou").item() == pytest.approx(iou - 1 / 13, rel=1e-5)
    assert bbox_iou(a, b, "ciou").item() == pytest.approx(iou - 1 / 13, rel=1e-5)  # same aspect
    far = torch.tensor([[10.0, 0.0, 2.0, 2.0]])
    assert bbox_iou(a, far).item() == 0.0 and bbox_iou(a, far, "giou").item() < 0


def test_works_on_a_ddp_style_wrapper(raw_preds):
    preds, targets, model = raw_preds
    wrapped = torch.nn.DataParallel(model)
    assert torch.equal(_parts(wrapped, preds, targets), _parts(model, preds, targets))


def test_gains_scale_with_image_size_and_classes(raw_preds):
    preds, targets, model = raw_preds
    full = YoloLoss(model, DEFAULT_HYP, imgsz=640)
    half = YoloLoss(model, DEFAULT_HYP, imgsz=320)
    assert half.obj_gain == pytest.approx(full.obj_gain / 4) and half.box_gain == full.box_gain
    parts_full, parts_half = full(preds, targets)[1], half(preds, targets)[1]
    assert parts_half[1] == pytest.approx(parts_full[1].item() / 4, rel=1e-6)
    assert torch.equal(parts_half[[0, 2]], parts_full[[0, 2]])
