"""The runtime: upstream-identical detections, every input kind, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

import edgeyolo
from edgeyolo.runtime.postprocess import nms, non_max_suppression
from edgeyolo.runtime.preprocess import LetterboxSettings, letterbox

# Measured: our cpu-fp32 boxes sit within 2.5e-4 px of upstream detect.py's (PyTorch) and its scores
# within 6e-7; the bounds below leave float32 noise across CPUs and ONNX Runtime builds, nothing more.
# (IoU >= 0.95 would hide boxes left unclipped by tens of pixels.)
UPSTREAM_BOX_TOL_PX, UPSTREAM_SCORE_TOL = 1e-3, 1e-5


def assert_matches_upstream(dets, upstream: list[dict]):
    """Same detections as upstream, one for one: same class, box corners and score within float32 noise."""
    assert sorted(dets.class_id.tolist()) == sorted(d["class_id"] for d in upstream)
    unused = set(range(len(dets)))
    for ref in upstream:
        close = [i for i in unused if dets.class_id[i] == ref["class_id"]
                 and np.abs(dets.xyxy[i] - ref["xyxy"]).max() <= UPSTREAM_BOX_TOL_PX
                 and abs(dets.confidence[i] - ref["score"]) <= UPSTREAM_SCORE_TOL]
        assert close, (ref, dets.to_list())
        unused.remove(close[0])


@pytest.fixture(scope="module")
def detector(cpu_fp32_bundle):
    return edgeyolo.load(cpu_fp32_bundle)


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_reproduces_upstream_detect_640x640(detector, sample_images, expected_dir, name):
    expected = json.loads((expected_dir / "detect_yolov5n_upstream_640x640.json").read_text())
    assert expected["letterbox"]["auto"] is False
    path = next(p for p in sample_images if p.name == name)
    dets = detector.detect(path, conf=expected["conf_thres"], iou=expected["iou_thres"], max_det=expected["max_det"])
    assert_matches_upstream(dets, expected["images"][name]["detections"])


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_reproduces_upstream_detect_auto_letterbox(yolov5n_pt, sample_images, expected_dir, tmp_path_factory, name):
    """A dynamic-shape engine gets YOLOv5's minimal-padding letterbox, as upstream's detect.py."""
    from edgeyolo.build import build_bundle

    expected = json.loads((expected_dir / "detect_yolov5n_upstream_auto.json").read_text())
    assert expected["letterbox"]["auto"] is True
    out = tmp_path_factory.getbasetemp() / "cpu-fp32-dynamic"
    if not out.exists():
        build_bundle(yolov5n_pt, "cpu-fp32-dynamic", out)
    det = edgeyolo.load(out)
    path = next(p for p in sample_images if p.name == name)
    image = cv2.imread(str(path))
    _, info = letterbox(image, det.letterbox)
    assert list(info.input_hw) == expected["images"][name]["input_tensor_shape"][2:]
    dets = det.detect(image, conf=expected["conf_thres"], iou=expected["iou_thres"], max_det=expected["max_det"])
    assert_matches_upstream(dets, expected["images"][name]["detections"])


def test_letterbox_matches_upstream_geometry(sample_images, expected_dir):
    expected = json.loads((expected_dir / "detect_yolov5n_upstream_640x640.json").read_text())["images"]["bus.jpg"]
    boxed, info = letterbox(cv2.imread(str(sample_images[0])), LetterboxSettings())
    assert boxed.shape == (640, 640, 3)
    assert info.ratio == pytest.approx(expected["ratio"][0])
    assert list(info.pad) == expected["pad_wh"]
    assert (boxed[:, :80] == 114).all() and (boxed[:, -80:] == 114).all()


def test_detect_honours_conf_and_max_det(detector, images):
    """Every kept score passes ``conf`` (objectness x class probability); ``max_det`` keeps the best ones."""
    bus = images[0]
    loose, strict = detector.detect(bus, conf=0.04), detector.detect(bus, conf=0.05)
    assert (loose.confidence <= 0.05).any(), "the image must have scores between the two thresholds"
    assert (strict.confidence > 0.05).all()
    # a lower threshold only adds boxes: greedy NMS never lets a weaker box suppress a stronger one
    np.testing.assert_array_equal(loose[loose.confidence > 0.05].xyxy, strict.xyxy)
    best_two = detector.detect(bus, conf=0.05, max_det=2)
    assert len(best_two) == 2 < len(strict)
    np.testing.assert_array_equal(best_two.xyxy, strict.xyxy[:2])
    assert len(detector.detect(bus, conf=0.05, max_det=1, multi_label=True)) == 1


def test_every_input_kind_gives_the_same_detections(detector, sample_images):
    from PIL import Image

    path = sample_images[0]
    bgr = cv2.imread(str(path))
    by_path = detector.detect(path)
    by_str = detector.detect(str(path))
    by_array = detector.detect(bgr)
    by_pil = detector.detect(Image.open(path))
    for other in (by_str, by_array):  # the same pixels: the same boxes, bit for bit
        np.testing.assert_array_equal(other.xyxy, by_path.xyxy)
        np.testing.assert_array_equal(other.class_id, by_path.class_id)
    # PIL decodes the JPEG with its own libjpeg: pixels differ by a level or two, boxes by a fraction of a pixel
    np.testing.assert_allclose(by_pil.xyxy, by_path.xyxy, atol=0.5)
    np.testing.assert_array_equal(by_pil.class_id, by_path.class_id)
    listed = detector.detect([path, bgr])
    assert isinstance(listed, list) and len(listed) == 2
    np.testing.assert_array_equal(listed[0].xyxy, by_path.xyxy)
    np.testing.assert_array_equal(listed[1].xyxy, by_path.xyxy)


def test_grayscale_rgba_and_16bit_images(detector, sample_images, tmp_path):
    bgr = cv2.imread(str(sample_images[0]))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    deep = bgr.astype(np.uint16) * 257
    reference = detector.detect(bgr)
    for variant in (bgra, deep):  # alpha dropped, 16 bits scaled down: the very same pixels
        dets = detector.detect(variant)
        np.testing.assert_array_equal(dets.xyxy, reference.xyxy)
        np.testing.assert_array_equal(dets.confidence, reference.confidence)
    for name, image in (("gray.png", gray), ("rgba.png", bgra), ("deep.png", deep)):
        cv2.imwrite(str(tmp_path / name), image)
        dets = detector.detect(tmp_path / name)
        assert dets.image_hw == bgr.shape[:2]
        assert (dets.class_id == 0).sum() >= 3  # the people are still found
    assert len(detector.detect(gray[:, :, None])) >= 3


def test_detections_value_type(detector, sample_images):
    dets = detector.detect(sample_images[0])
    assert "person" in str(dets)
    items = json.loads(dets.to_json())
    assert items[0]["class_name"] == "person" and len(items[0]["xyxy"]) == 4
    mask = dets.confidence > 0.6
    strong = dets[mask]
    assert 0 < len(strong) < len(dets)  # bus.jpg has detections on both sides of 0.6
    assert (strong.confidence > 0.6).all() and strong.names == dets.names and strong.image_hw == dets.image_hw
    np.testing.assert_array_equal(strong.xyxy, dets.xyxy[mask])
    np.testing.assert_array_equal(strong.class_id, dets.class_id[mask])
    first = dets[0]
    assert len(first) == 1 and first.confidence[0] == dets.confidence.max()  # best first
    image = cv2.imread(str(sample_images[0]))
    drawn = dets.draw(image)
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)


def test_nms_is_class_aware_and_multilabel_keeps_every_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5).tolist() == [0, 2]
    # Two overlapping boxes of different classes both survive.
    pred = np.zeros((2, 5 + 3), np.float32)
    pred[:, :4] = [[5, 5, 10, 10], [5.2, 5.2, 10, 10]]
    pred[:, 4] = 0.9
    pred[0, 5 + 0] = 0.9
    pred[1, 5 + 1] = 0.8
    rows = non_max_suppression(pred, 0.25, 0.45)
    assert sorted(rows[:, 5].tolist()) == [0.0, 1.0]
    # multi_label: one box scoring for two classes is kept once per class.
    pred2 = pred[:1].copy()
    pred2[0, 5:] = [0.9, 0.5, 0.0]
    assert len(non_max_suppression(pred2, 0.25, 0.45, multi_label=True)) == 2
    assert len(non_max_suppression(pred2, 0.25, 0.45, multi_label=False)) == 1


def test_runtime_does_not_import_torch(cpu_fp32_bundle, sample_images):
    code = (
        "import sys, edgeyolo, edgeyolo.runtime\n"
        f"d = edgeyolo.load({str(cpu_fp32_bundle)!r})\n"
        f"r = d.detect({str(sample_images[0])!r})\n"
        "assert len(r) >= 4\n"
        "bad = [m for m in ('torch', 'onnx', 'onnxslim', 'tensorflow') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
