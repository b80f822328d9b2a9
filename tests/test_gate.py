"""The accuracy gate of `edgeyolo build --val DATA --max-drop N`: records both results, fails a bad build."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgeyolo.cli import cli

pytest.importorskip("openvino")
pytest.importorskip("nncf")

VAL_IMAGES = 20  # enough to separate a broken INT8 build (mAP near 0) from a sound one, quick to evaluate twice


@pytest.fixture(scope="module")
def small_val(coco_val, tmp_path_factory) -> Path:
    """The first images of coco-val-500 with their labels, as a YOLO-layout folder (symlinks)."""
    root = tmp_path_factory.mktemp("val")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for image in sorted((coco_val / "images").glob("*.jpg"))[:VAL_IMAGES]:
        (root / "images" / image.name).symlink_to(image)
        label = coco_val / "labels" / f"{image.stem}.txt"
        if label.is_file():
            (root / "labels" / label.name).symlink_to(label)
    return root


@pytest.fixture(scope="module")
def blank_calibration(tmp_path_factory) -> Path:
    """Uniform grey frames: they tell the quantiser nothing about real activation ranges."""
    folder = tmp_path_factory.mktemp("blank")
    for i in range(8):
        cv2.imwrite(str(folder / f"blank{i}.png"), np.full((480, 640, 3), 114, np.uint8))
    return folder


def _build(*args: str):
    return CliRunner().invoke(cli, ["build", *args])


def _no_bundle(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.slow  # an engine build of its own; CI's full run keeps it
def test_gate_fails_a_badly_calibrated_int8_build(yolov5n_pt, small_val, blank_calibration, tmp_path):
    out = tmp_path / "bad-int8"
    result = _build(str(yolov5n_pt), "-t", "intel-cpu-int8", "-o", str(out), "--calib", str(blank_calibration),
                    "--val", str(small_val), "--max-drop", "0.5")
    assert result.exit_code == 1, result.output
    text = result.output.replace("\n", " ")
    assert "accuracy gate failed" in text and "no bundle written" in text
    assert "FAIL" in text and "reference" in text  # both results shown side by side
    assert _no_bundle(out)


def test_gate_passes_and_records_both_results(yolov5n_pt, small_val, tmp_path):
    out = tmp_path / "fp32"
    result = _build(str(yolov5n_pt), "-t", "intel-cpu-fp32", "-o", str(out), "--val", str(small_val),
                    "--max-drop", "0.1")
    assert result.exit_code == 0, result.output
    accuracy = json.loads((out / "manifest.json").read_text())["accuracy"]
    assert accuracy["passed"] is True and accuracy["images"] == VAL_IMAGES
    assert accuracy["evaluated_with"] == "openvino"
    assert accuracy["reference"]["target"] == "cpu-fp32" and accuracy["this"]["target"] == "intel-cpu-fp32"
    assert accuracy["reference"]["map50_95"] > 0.1
    assert abs(accuracy["this"]["map50_95"] - accuracy["reference"]["map50_95"]) < 1e-3
    assert abs(accuracy["drop_points"]) < 0.1 and accuracy["max_drop_points"] == 0.1


def test_reference_result_is_cached(yolov5n_pt, small_val):
    from edgeyolo.build import cached_reference_bundle
    from edgeyolo.datasets import load_dataset
    from edgeyolo.gate import reference_result

    first = reference_result(yolov5n_pt, load_dataset(small_val))
    evaluations = cached_reference_bundle(yolov5n_pt).manifest["evaluations"]
    assert any(key.endswith(f"#{VAL_IMAGES}") for key in evaluations)
    assert reference_result(yolov5n_pt, load_dataset(small_val)) == first


def test_val_without_labels_is_refused_before_building(yolov5n_pt, coco_val, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "images").mkdir(parents=True)
    for image in sorted((coco_val / "images").glob("*.jpg"))[:3]:
        (unlabelled / "images" / image.name).symlink_to(image)
    out = tmp_path / "bundle"
    result = _build(str(yolov5n_pt), "-t", "intel-cpu-fp32", "-o", str(out), "--val", str(unlabelled))
    assert result.exit_code == 2, result.output
    assert "no label files" in result.output.replace("\n", " ")
    assert _no_bundle(out)


def test_val_that_does_not_exist(yolov5n_pt, tmp_path):
    out = tmp_path / "bundle"
    result = _build(str(yolov5n_pt), "-t", "intel-cpu-fp32", "-o", str(out), "--val", str(tmp_path / "nowhere"))
    assert result.exit_code == 2, result.output
    assert _no_bundle(out)
