"""Hyp files are untrusted input: defaults are upstream's, every bad key or value is one clear line."""

from __future__ import annotations

import pytest

from edgeyolo.errors import EdgeYoloError
from edgeyolo.train.hyp import DEFAULT_HYP, load_hyp


def test_defaults_are_yolov5_scratch_low():
    assert (DEFAULT_HYP["lr0"], DEFAULT_HYP["momentum"], DEFAULT_HYP["box"], DEFAULT_HYP["anchor_t"]) == (
        0.01, 0.937, 0.05, 4.0)
    assert DEFAULT_HYP["mosaic"] == 1.0 and DEFAULT_HYP["blur"] == 0.01 and DEFAULT_HYP["rotate90"] == 0.0
    assert DEFAULT_HYP["iou_type"] == "ciou" and DEFAULT_HYP["label_smoothing"] == 0.0


def test_file_then_overrides(tmp_path):
    path = tmp_path / "hyp.yaml"
    path.write_text("lr0: 0.002\nfliplr: 0\niou_type: GIoU\n")
    hyp = load_hyp(path, {"lr0": 0.005, "mosaic": None})
    assert (hyp["lr0"], hyp["fliplr"], hyp["iou_type"], hyp["mosaic"]) == (0.005, 0.0, "giou", 1.0)


@pytest.mark.parametrize("text, message", [
    ("lr00: 0.1", "unknown key 'lr00'"),
    ("lr0: fast", "lr0 must be a number"),
    ("lr0: .nan", "lr0 must be finite"),
    ("fliplr: 1.5", "fliplr = 1.5 is out of range"),
    ("iou_type: siou", "iou_type must be one of"),
    ("mosaic: true", "mosaic must be a number"),
    ("- 1\n- 2", "must be a mapping"),
    ("a: [", "not a valid YAML"),
])
def test_bad_hyp_files(tmp_path, text, message):
    path = tmp_path / "hyp.yaml"
    path.write_text(text)
    with pytest.raises(EdgeYoloError) as info:
        load_hyp(path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
