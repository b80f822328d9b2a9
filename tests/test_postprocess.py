"""Letterbox, thresholds, max_det and box rescaling on hand-made inputs: fast, and each pinned to YOLOv5's rule."""

from __future__ import annotations

import numpy as np
import pytest

from edgeyolo.runtime.postprocess import non_max_suppression, scale_boxes
from edgeyolo.runtime.preprocess import LetterboxInfo, LetterboxSettings, letterbox


# --------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("hw", [(481, 640), (640, 481)], ids=["pads-rows", "pads-columns"])
def test_odd_padding_puts_the_extra_pixel_after_the_image(hw):
    """YOLOv5: top/left = round(d - 0.1), bottom/right = round(d + 0.1); 159 px of padding split 79 + 80."""
    image = np.zeros((*hw, 3), np.uint8)
    boxed, info = letterbox(image, LetterboxSettings())
    assert boxed.shape == (640, 640, 3)
    grey = (boxed == 114).all(axis=2)
    if hw[0] == 481:
        assert info.pad == (0.0, 79.5)
        rows = grey.all(axis=1)
        assert rows[:79].all() and not rows[79:560].any() and rows[560:].all()
    else:
        assert info.pad == (79.5, 0.0)
        cols = grey.all(axis=0)
        assert cols[:79].all() and not cols[79:560].any() and cols[560:].all()


def test_letterbox_scales_by_the_long_side_and_keeps_the_pad_fraction():
    image = np.zeros((300, 500, 3), np.uint8)  # r = 640/500 = 1.28 → 640 x 384, 256 px of rows to pad
    boxed, info = letterbox(image, LetterboxSettings())
    assert info.ratio == pytest.approx(1.28) and info.pad == (0.0, 128.0) and info.orig_hw == (300, 500)
    rows = (boxed == 114).all(axis=(1, 2))
    assert rows[:128].all() and not rows[128:512].any() and rows[512:].all()


# --------------------------------------------------------------------------- scale_boxes
def test_scale_boxes_inverts_the_letterbox_and_clips_to_the_image():
    info = LetterboxInfo(orig_hw=(480, 640), ratio=1.0, pad=(0.0, 80.0), input_hw=(640, 640))
    boxes = np.array([[10, 90, 110, 190],  # inside: only the pad is removed
                      [-20, 40, 700, 600],  # beyond every edge of the image (into the padding)
                      [600, 500, 660, 570]], np.float32)
    out = scale_boxes(boxes, info)
    np.testing.assert_array_equal(out[0], [10, 10, 110, 110])
    np.testing.assert_array_equal(out[1], [0, 0, 640, 480])
    np.testing.assert_array_equal(out[2], [600, 420, 640, 480])
    assert boxes[1, 0] == -20, "the input is not modified"


def test_scale_boxes_divides_by_the_ratio():
    info = LetterboxInfo(orig_hw=(1080, 810), ratio=640 / 1080, pad=(80.0, 0.0), input_hw=(640, 640))
    out = scale_boxes(np.array([[80, 0, 560, 640]], np.float32), info)
    np.testing.assert_allclose(out, [[0, 0, 810, 1080]], atol=1e-3)


# --------------------------------------------------------------------------- thresholds and max_det
def _pred(rows) -> np.ndarray:
    """Rows of (cx, cy, w, h, objectness, class scores...), far apart so NMS keeps them all."""
    pred = np.zeros((len(rows), 5 + 3), np.float32)
    for i, (obj, *cls) in enumerate(rows):
        pred[i, :4] = [50 + 100 * i, 50, 20, 20]
        pred[i, 4] = obj
        pred[i, 5:5 + len(cls)] = cls
    return pred


@pytest.mark.parametrize("multi_label", [False, True])
def test_class_score_threshold_is_objectness_times_class_probability(multi_label):
    # scores 0.9 * (0.30, 0.27, 0.25, 0.22) = 0.270, 0.243, 0.225, 0.198: only the first passes 0.25,
    # the next three all pass a threshold 20% lower (0.2) but for the last.
    pred = _pred([(0.9, 0.30), (0.9, 0.27), (0.9, 0.25), (0.9, 0.22)])
    rows = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45, multi_label=multi_label)
    assert rows[:, 4].tolist() == pytest.approx([0.27])
    rows = non_max_suppression(pred, conf_thres=0.2, iou_thres=0.45, multi_label=multi_label)
    assert rows[:, 4].tolist() == pytest.approx([0.27, 0.243, 0.225])


def test_objectness_alone_does_not_pass_the_threshold():
    pred = _pred([(0.26, 0.5), (0.24, 1.0)])  # 0.13 and 0.24: neither reaches 0.25
    assert len(non_max_suppression(pred, 0.25, 0.45)) == 0


def test_max_det_keeps_the_best_scores():
    pred = _pred([(0.9, s) for s in (0.5, 0.9, 0.7, 0.8, 0.6)])
    rows = non_max_suppression(pred, 0.25, 0.45, max_det=2)
    assert rows[:, 4].tolist() == pytest.approx([0.81, 0.72])
    assert len(non_max_suppression(pred, 0.25, 0.45, max_det=300)) == 5
    assert len(non_max_suppression(pred, 0.25, 0.45, max_det=1, multi_label=True)) == 1
