"""What other tools read: supervision.Detections, YOLO txt, COCO results json, annotated video; labels drawn inside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeyolo.runtime.detections import Detections, label_box
from edgeyolo.sources import resolve_sources
from edgeyolo.writers import (
    coco_image_id,
    coco_results,
    write_coco_json,
    write_yolo_txt,
    yolo_lines,
)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "edgeyolo.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=300, env=env)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def bus_dets(cpu_fp32_bundle, images) -> Detections:
    import edgeyolo

    dets = edgeyolo.load(cpu_fp32_bundle).detect(images[0])
    assert len(dets) >= 3
    return dets


# --------------------------------------------------------------------------- supervision
def test_supervision_round_trip(bus_dets):
    sv = pytest.importorskip("supervision")
    converted = bus_dets.to_supervision()
    assert isinstance(converted, sv.Detections) and len(converted) == len(bus_dets)
    np.testing.assert_allclose(converted.xyxy, bus_dets.xyxy)
    assert list(converted.data["class_name"]) == bus_dets.class_name
    back = Detections.from_supervision(converted, names=bus_dets.names, image_hw=bus_dets.image_hw)
    np.testing.assert_array_equal(back.xyxy, bus_dets.xyxy)
    np.testing.assert_array_equal(back.confidence, bus_dets.confidence)
    np.testing.assert_array_equal(back.class_id, bus_dets.class_id)
    assert back.class_name == bus_dets.class_name


def test_from_supervision_takes_names_from_its_data_and_fills_missing_fields():
    sv = pytest.importorskip("supervision")
    plain = sv.Detections(xyxy=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), class_id=np.array([2, 0]),
                          data={"class_name": np.array(["car", "person"])})
    dets = Detections.from_supervision(plain)
    assert dets.class_name == ["car", "person"]
    np.testing.assert_array_equal(dets.confidence, [1, 1])


def test_to_supervision_without_the_package_names_the_extra(bus_dets, monkeypatch):
    from edgeyolo.errors import EdgeYoloError

    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(EdgeYoloError, match=r"pip install 'edgeyolo\[supervision\]'"):
        bus_dets.to_supervision()


# --------------------------------------------------------------------------- writers
def test_yolo_txt_lines_are_normalised_centre_boxes(bus_dets, tmp_path):
    height, width = bus_dets.image_hw
    path = write_yolo_txt(tmp_path / "labels" / "bus.txt", bus_dets)
    rows = np.loadtxt(path, ndmin=2)
    assert rows.shape == (len(bus_dets), 6)
    x1, y1, x2, y2 = bus_dets.xyxy.T
    np.testing.assert_allclose(rows[:, 0], bus_dets.class_id)
    np.testing.assert_allclose(rows[:, 1], (x1 + x2) / 2 / width, atol=1e-5)
    np.testing.assert_allclose(rows[:, 4], (y2 - y1) / height, atol=1e-5)
    np.testing.assert_allclose(rows[:, 5], bus_dets.confidence, atol=1e-4)
    assert yolo_lines(Detections(image_hw=(10, 10))) == []


def test_coco_results_load_in_the_coco_evaluator(bus_dets, tmp_path):
    faster_coco_eval = pytest.importorskip("faster_coco_eval")
    image_id = coco_image_id("000000000139.jpg")
    assert image_id == 139 and coco_image_id("bus.jpg") == "bus"
    path = write_coco_json(tmp_path / "predictions.json", coco_results(bus_dets, image_id))
    entries = json.loads(path.read_text())
    assert len(entries) == len(bus_dets)
    x, y, w, h = entries[0]["bbox"]
    np.testing.assert_allclose([x, y, x + w, y + h], bus_dets.xyxy[0], atol=1e-2)
    height, width = bus_dets.image_hw
    gt = faster_coco_eval.COCO()
    gt.dataset = {"images": [{"id": 139, "height": height, "width": width}],
                  "categories": [{"id": i, "name": n} for i, n in enumerate(bus_dets.names)], "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(str(path)).anns) == len(bus_dets)


def test_detect_save_txt_and_save_json(cpu_fp32_bundle, sample_images, tmp_path):
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, *sample_images, "--json", "--save-dir", tmp_path,
                                 "--save-txt", "--save-json")
    assert rc == 0, stderr
    printed = {Path(r["source"]).stem: r["detections"] for r in json.loads(stdout)}
    for stem, dets in printed.items():
        assert len((tmp_path / "labels" / f"{stem}.txt").read_text().splitlines()) == len(dets)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted({p["image_id"] for p in predictions}) == sorted(printed)
    assert len(predictions) == sum(map(len, printed.values()))


def test_save_txt_without_save_dir_is_one_line(cpu_fp32_bundle, sample_images):
    rc, _, stderr = run_cli("detect", cpu_fp32_bundle, sample_images[0], "--save-txt")
    assert rc == 2 and "--save-dir" in stderr and "Traceback" not in stderr


# --------------------------------------------------------------------------- video and camera
def test_video_in_annotated_video_out_with_fps(cpu_fp32_bundle, images, tmp_path):
    frame = cv2.resize(images[1], (640, 360))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (640, 360))
    for _ in range(4):
        writer.write(frame)
    writer.release()
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, video, "--save-dir", tmp_path / "out", "--save-txt")
    assert rc == 0, stderr
    assert "4 frames at" in stderr and "clip.mp4" in stderr
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    written = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        written.append(image)
    capture.release()
    assert len(written) == 4 and written[0].shape == frame.shape
    # the FPS badge: a black box with white text in the top-left corner, on a frame where that is not so
    corner = written[1][:20, :60].astype(int)
    assert (corner.max(axis=2) < 60).mean() > 0.4 and (corner.min(axis=2) > 180).any()
    assert len(list((tmp_path / "out" / "labels").glob("clip_*.txt"))) == 4


def test_a_camera_runs_until_ctrl_c_and_leaves_a_playable_video(cpu_fp32_bundle, images, tmp_path, monkeypatch):
    """No camera here: camera 0 is a video file whose third frame meets Ctrl-C."""
    from click.testing import CliRunner

    from edgeyolo import video
    from edgeyolo.cli import cli

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 180))
    for _ in range(5):
        writer.write(cv2.resize(images[1], (320, 180)))
    writer.release()
    real_open, real_frames = video.open_capture, video.frames

    def frames_until_ctrl_c(capture):
        for index, frame in real_frames(capture):
            if index == 2:
                raise KeyboardInterrupt
            yield index, frame

    monkeypatch.setattr(video, "open_capture", lambda source: real_open(clip if source == 0 else source))
    monkeypatch.setattr(video, "frames", frames_until_ctrl_c)
    result = CliRunner().invoke(cli, ["detect", str(cpu_fp32_bundle), "0", "--save-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    capture = cv2.VideoCapture(str(tmp_path / "out" / "camera0.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    capture.release()


def test_a_camera_index_is_a_source_and_a_missing_camera_is_one_line(cpu_fp32_bundle):
    assert [s.kind for s in resolve_sources(["0"])] == ["camera"]
    rc, _, stderr = run_cli("detect", cpu_fp32_bundle, "97")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "camera 97" in errors[0], stderr


# --------------------------------------------------------------------------- labels inside the image
@given(x1=st.integers(-50, 700), y1=st.integers(-50, 500), tw=st.integers(1, 200), th=st.integers(1, 40))
def test_label_box_lies_inside_the_image(x1, y1, tw, th):
    height, width = 480, 640
    x, y, w, h = label_box((x1, y1), (tw, th), (height, width))
    assert 0 <= x and x + w <= width and 0 <= y and y + h <= height


def _text_pixels(xyxy, hw) -> int:
    """White (label text) pixels drawn for one box on a black image of size ``hw``."""
    dets = Detections(xyxy=np.array([xyxy], np.float32), confidence=np.array([0.9], np.float32),
                      class_id=np.array([0]), names=["person"], image_hw=hw)
    drawn = dets.draw(np.zeros((*hw, 3), np.uint8))
    return int((drawn.min(axis=2) > 200).sum())


@pytest.mark.parametrize("xyxy", [(280, 0, 300, 60), (0, 0, 40, 40), (260, 170, 300, 200), (-10, -10, 310, 210)])
def test_labels_at_the_image_edges_are_drawn_whole(xyxy):
    whole = _text_pixels((130, 100, 180, 160), (200, 300))  # room on every side
    assert whole > 20
    assert abs(_text_pixels(xyxy, (200, 300)) - whole) <= 0.1 * whole
