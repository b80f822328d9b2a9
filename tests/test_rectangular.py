"""Rectangular static engines (``imgsz = [384, 640]``, the ``*-video16x9`` targets) on every CPU backend.

A 16:9 frame is letterboxed to the same 640x360 on a 384x640 engine as on the square one, so
both must find the same objects at the same places in the original frame: that checks the
export, each backend's non-square input and the box mapping back (pad on top and bottom only).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from detection_match import unmatched

from edgeyolo.runtime import load

RECT = (384, 640)
# Square vs 384x640 engine on the same 16:9 frame, detections scoring >= 0.3: measured IoU >= 0.98 and scores
# within 0.02 (only the padding's border effects differ); a box mapped back with a wrong pad or scale moves by
# >= 12 px (the 384-row engine's pad) and drops far below this IoU.
MIN_SCORE, MIN_IOU, SCORE_TOL = 0.3, 0.95, 0.05


def build(weights, target, folder, imgsz=None, calibration=None):
    from edgeyolo.build import BuildOptions, build_bundle

    name = getattr(target, "name", target)
    return build_bundle(weights, target, folder / name, BuildOptions(imgsz=imgsz), calibration=calibration).path


@pytest.fixture(scope="module")
def video_frame(sample_images) -> np.ndarray:
    """A 1280x720 frame, 16:9 as a camera gives it: bus.jpg scaled to 540x720 beside 740 columns of zidane.jpg."""
    bus, zidane = (cv2.imread(str(p)) for p in sample_images)
    frame = np.hstack([cv2.resize(bus, (540, 720), interpolation=cv2.INTER_AREA), zidane[:, 270:1010]])
    assert frame.shape == (720, 1280, 3)
    return frame


@pytest.fixture(scope="module")
def square_reference(cpu_fp32_bundle, video_frame):
    dets = load(cpu_fp32_bundle).detect(video_frame)
    assert (dets.confidence >= 0.5).sum() >= 3
    return dets


def check_bundle(bundle, frame, reference, min_iou=MIN_IOU, score_tol=SCORE_TOL, min_score=MIN_SCORE,
                 both_ways=True) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    shape = manifest["input"]["shape"]
    assert shape[2:] == list(RECT) or shape[1:3] == list(RECT)  # NCHW, or NHWC (TFLite)
    assert manifest["preprocess"]["imgsz"] == list(RECT)
    detector = load(bundle)
    got = detector.detect(frame)
    assert unmatched(reference, got, min_iou=min_iou, score_tol=score_tol, min_score=min_score) == []
    if both_ways:  # nothing found that the square engine does not find either
        assert unmatched(got, reference, min_iou=min_iou, score_tol=score_tol, min_score=min_score) == []
    h, w = frame.shape[:2]
    assert (got.xyxy >= -1).all() and (got.xyxy[:, [0, 2]] <= w + 1).all() and (got.xyxy[:, [1, 3]] <= h + 1).all()
    streamed = list(detector.stream([frame, frame[:, ::-1].copy()], depth=2))  # a rectangular stream too
    assert np.array_equal(streamed[0].xyxy, got.xyxy)


def test_onnxruntime_video16x9_target(yolov5n_pt, tmp_path_factory, video_frame, square_reference):
    check_bundle(build(yolov5n_pt, "cpu-fp32-video16x9", tmp_path_factory.mktemp("rect")), video_frame,
                 square_reference)


def test_openvino_video16x9_target(yolov5n_pt, tmp_path_factory, video_frame, square_reference):
    pytest.importorskip("openvino")
    check_bundle(build(yolov5n_pt, "intel-cpu-fp32-video16x9", tmp_path_factory.mktemp("rect")), video_frame,
                 square_reference)


@pytest.mark.slow  # calibration and NNCF: minutes on a loaded 2-core machine
def test_openvino_int8_video16x9_target_calibrates_at_its_own_size(yolov5n_pt, coco128, tmp_path_factory,
                                                                   video_frame, square_reference):
    pytest.importorskip("nncf")
    from edgeyolo.build import prepare_calibration
    from edgeyolo.targets import load_target

    target = load_target("intel-cpu-int8-video16x9")
    calibration = prepare_calibration(yolov5n_pt, target, coco128 / "images", size=16)
    assert calibration.letterbox.imgsz == RECT
    bundle = build(yolov5n_pt, target, tmp_path_factory.mktemp("rect"), calibration=calibration)
    # INT8 vs the FP32 square engine, as test_openvino bounds INT8 parity: every confident FP32 box found again
    # (not the reverse: a score near 0.5 may cross it either way)
    check_bundle(bundle, video_frame, square_reference, min_iou=0.9, score_tol=0.06, min_score=0.5, both_ways=False)


@pytest.mark.slow
def test_tflite_rectangular_build(yolov5n_pt, tmp_path_factory, video_frame, square_reference):
    pytest.importorskip("onnx2tf")
    check_bundle(build(yolov5n_pt, "arm-fp32", tmp_path_factory.mktemp("rect"), imgsz=RECT), video_frame,
                 square_reference)
