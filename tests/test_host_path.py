"""The lean host path: reused letterbox buffers, one-pass input, candidates-first decode, OpenCV NMS.

Each saving must give exactly the numbers of the plain path it replaced (written out here).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from edgeyolo.runtime.images import jpeg_size, read_image_reduced, reduction
from edgeyolo.runtime.postprocess import (
    _grids,
    head_candidates,
    nms,
    non_max_suppression,
)
from edgeyolo.runtime.preprocess import (
    LetterboxCanvas,
    LetterboxSettings,
    letterbox,
    to_input,
)

STRIDES, ANCHORS = [8, 16, 32], [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def plain_letterbox(image, settings):
    """YOLOv5's letterbox written out: resize, then pad (what the canvas must reproduce)."""
    h0, w0 = image.shape[:2]
    r = min(settings.imgsz[0] / h0, settings.imgsz[1] / w0)
    w, h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = (settings.imgsz[1] - w) / 2, (settings.imgsz[0] - h) / 2
    if (w, h) != (w0, h0):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.copyMakeBorder(image, int(round(dh - 0.1)), int(round(dh + 0.1)), int(round(dw - 0.1)),
                              int(round(dw + 0.1)), cv2.BORDER_CONSTANT, value=(114, 114, 114))


def plain_to_input(boxed, layout):
    rgb = boxed[:, :, ::-1]
    if layout == "NCHW":
        rgb = rgb.transpose(2, 0, 1)
    return np.ascontiguousarray(rgb, dtype=np.float32)[None] / np.float32(255.0)


def plain_nms(boxes, scores, iou_threshold):
    """The greedy Python loop the OpenCV NMS replaced."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-12) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


SHAPES = [(480, 640), (1080, 810), (720, 1280), (640, 640), (100, 37), (480, 640), (300, 1000)]


def test_canvas_letterbox_equals_the_plain_one_across_geometry_changes():
    rng = np.random.default_rng(0)
    settings, canvas = LetterboxSettings(imgsz=(320, 416)), LetterboxCanvas()
    for h, w in SHAPES + SHAPES[::-1]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        boxed, info = letterbox(image, settings, canvas)
        expected, expected_info = letterbox(image, settings)
        assert np.array_equal(boxed, plain_letterbox(image, settings)) and np.array_equal(boxed, expected)
        assert info == expected_info
        assert boxed is canvas.buffer  # reused, not reallocated


def test_canvas_per_thread_keeps_threads_apart():
    settings = LetterboxSettings(imgsz=(256, 256))
    images = [np.random.default_rng(i).integers(0, 256, SHAPES[i % len(SHAPES)] + (3,), dtype=np.uint8)
              for i in range(8)]
    expected = [plain_to_input(plain_letterbox(im, settings), "NCHW") for im in images]
    failures = []

    def run(offset):
        canvas = LetterboxCanvas()
        for k in range(40):
            i = (k + offset) % len(images)
            boxed, _ = letterbox(images[i], settings, canvas)
            batch = to_input(boxed, "NCHW", out=canvas.input_buffer((1, 3, 256, 256)))
            if not np.array_equal(batch, expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_to_input_is_exactly_rgb_over_255(layout):
    boxed = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    got = to_input(boxed, layout)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, plain_to_input(boxed, layout))


@pytest.mark.parametrize("head", ["sigmoid", "decoded"])
@pytest.mark.parametrize("conf", [0.0, 0.001, 0.25, 0.9])
def test_candidates_first_decode_equals_decoding_every_row(head, conf):
    input_hw = (256, 320)
    rows = sum((input_hw[0] // s) * (input_hw[1] // s) * 3 for s in STRIDES)
    raw = np.random.default_rng(2).uniform(0, 1, (rows, 85)).astype(np.float32)
    got = head_candidates(raw, conf, input_hw, head, STRIDES, ANCHORS)
    full = raw.copy()
    if head == "sigmoid":
        grid_xy, anchor_wh, stride = _grids(input_hw, tuple(STRIDES), tuple(map(tuple, ANCHORS)))
        full[:, 0:2] = (full[:, 0:2] * 2 + grid_xy) * stride
        full[:, 2:4] = (full[:, 2:4] * 2) ** 2 * anchor_wh
    assert np.array_equal(got, full[full[:, 4] > conf])


@pytest.mark.parametrize("seed", range(6))
def test_opencv_nms_keeps_what_the_greedy_loop_keeps(seed):
    rng = np.random.default_rng(seed)
    n = [5, 60, 400, 2000, 3000, 1][seed]
    xy = rng.uniform(0, 600, (n, 2)).astype(np.float32)
    wh = rng.uniform(2, 120, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.choice(np.linspace(0.01, 1, 50), n).astype(np.float32)  # ties, as real scores have
    labels = rng.integers(0, 5, n)
    offset = boxes + labels[:, None].astype(np.float32) * 7680
    for iou in (0.3, 0.45, 0.6):
        assert np.array_equal(nms(offset, scores, iou), plain_nms(offset, scores, iou))


def test_nms_on_a_real_image_matches_the_loop(cpu_fp32_bundle, sample_images):
    """conf 0.001, multi-label (eval settings): thousands of real, heavily overlapping boxes."""
    import edgeyolo

    detector = edgeyolo.load(cpu_fp32_bundle)
    image = cv2.imread(str(sample_images[0]))
    boxed, info = letterbox(image, detector.letterbox)
    raw = detector.engine.infer(boxed[None] if detector.takes_image else to_input(boxed))[0]
    pred = head_candidates(raw, 0.001, info.input_hw, "decoded", STRIDES, ANCHORS)
    cls = pred[:, 5:] * pred[:, 4:5]
    i, j = np.nonzero(cls > 0.001)
    xywh = pred[i, :4]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    offset = boxes + j[:, None].astype(np.float32) * 7680
    assert len(offset) > 1000
    assert np.array_equal(nms(offset, cls[i, j], 0.6), plain_nms(offset, cls[i, j], 0.6))
    rows = non_max_suppression(pred, 0.001, 0.6, multi_label=True)
    assert 0 < len(rows) <= 300


# --------------------------------------------------------------------------- reduced-scale JPEG decode
def test_jpeg_size_reads_the_frame_header(sample_images, tmp_path):
    for path in sample_images:
        data = np.fromfile(str(path), np.uint8)
        assert jpeg_size(data) == cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2]
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    assert jpeg_size(np.fromfile(str(png), np.uint8)) is None
    assert jpeg_size(np.frombuffer(b"\xff\xd8\xff\xe0\x00", np.uint8)) is None  # truncated


@pytest.mark.parametrize("full_hw, fit_hw, factor", [
    ((720, 1280), (640, 640), 2), ((1080, 810), (640, 640), 1), ((2160, 3840), (640, 640), 4),
    ((480, 640), (320, 320), 2), ((480, 640), (640, 640), 1), ((1279, 1279), (640, 640), 1)])
def test_reduction_only_when_the_letterbox_shrinks_at_least_k_times(full_hw, fit_hw, factor):
    assert reduction(full_hw, fit_hw) == factor


def test_reduced_decode_gives_the_same_detections_in_full_size_coordinates(cpu_fp32_bundle, sample_images, tmp_path):
    from detection_match import unmatched

    import edgeyolo

    big = tmp_path / "zidane-4k.jpg"  # 3x the input: read at 1/4 (zidane itself, 1280x720, at 1/2)
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(sample_images[1])), (3840, 2160)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    full, reduced = edgeyolo.load(cpu_fp32_bundle), edgeyolo.load(cpu_fp32_bundle, reduced_decode=True)
    for path, factor in ((sample_images[1], 2), (big, 4)):
        image, hw = read_image_reduced(path, (640, 640))
        assert image.shape[:2] == (-(-hw[0] // factor), -(-hw[1] // factor))
        a, b = full.detect(str(path)), reduced.detect(str(path))
        assert b.image_hw == a.image_hw == hw and len(a) >= 3
        assert (b.xyxy[:, 2] <= hw[1]).all() and (b.xyxy[:, 3] <= hw[0]).all()
        for ref, got in ((a, b), (b, a)):
            assert not unmatched(ref, got, score_tol=0.1, min_iou=0.9, min_score=0.4)


@pytest.mark.slow
def test_reduced_decode_accuracy_on_coco_val_at_320(yolov5n_pt, coco_val_dataset, tmp_path):
    """Documented: at a 320 input (every 640-wide coco-val-500 image read at 1/2) mAP50-95 +0.08, mAP50 -0.14."""
    import edgeyolo
    from edgeyolo.build import BuildOptions, build_bundle
    from edgeyolo.evaluate import evaluate

    bundle = build_bundle(yolov5n_pt, "cpu-fp32", tmp_path / "b320", BuildOptions(imgsz=320))
    full = evaluate(edgeyolo.load(bundle), coco_val_dataset)
    reduced = evaluate(edgeyolo.load(bundle, reduced_decode=True), coco_val_dataset)
    assert abs(reduced.map50_95 - full.map50_95) * 100 <= 0.1 and abs(reduced.map50 - full.map50) * 100 <= 0.2


def test_onnxruntime_pool_threads_sleep_instead_of_spinning(cpu_fp32_bundle):
    """Busy-waiting pool threads would take the core the host stages need (allow_spinning = true restores it)."""
    import edgeyolo
    from edgeyolo.backends.onnxruntime import session_options

    key = "session.intra_op.allow_spinning"
    session = edgeyolo.load(cpu_fp32_bundle).engine.session
    assert session.get_session_options().get_session_config_entry(key) == "0"
    assert session_options(0, "all", spinning=True).get_session_config_entry(key) == "1"
