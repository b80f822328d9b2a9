"""ONNX export: equal to PyTorch, simplified, tagged; static by default, dynamic on request."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeyolo.export import ExportOptions, check_imgsz, export_onnx, read_metadata
from edgeyolo.model import load_checkpoint
from edgeyolo.runtime.postprocess import decode_sigmoid_head
from edgeyolo.runtime.preprocess import LetterboxSettings, preprocess


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_checkpoint(yolov5n_pt).model


@pytest.fixture(scope="module")
def bus_input(sample_images):
    return preprocess(cv2.imread(str(sample_images[0])), LetterboxSettings())[0]


# Measured against PyTorch on bus.jpg: scores (and the sigmoid head) within 4.5e-6, decoded boxes (pixels up
# to 640) within 1.4e-3, i.e. 2e-6 relative. The bounds sit just above: float32 reordering, nothing more.
SCORE_TOL, BOX_TOL_PX, BOX_TOL_REL = 2e-5, 5e-3, 5e-6
# The host decode is the same arithmetic as the graph's: measured identical (0.0) on both input shapes.
HOST_DECODE_TOL_PX = 1e-4


@pytest.fixture(scope="module")
def exported(yolov5n, exported_onnx, tmp_path_factory):
    """Each head as a static 640x640 ONNX (the session's) and a dynamic-shape one (exported here)."""
    folder = tmp_path_factory.mktemp("export")
    files = {(head, "static"): exported_onnx[head] for head in ("decoded", "sigmoid")}
    for head in ("decoded", "sigmoid"):
        options = ExportOptions(head=head, dynamic_shape=True)
        files[head, "dynamic"] = export_onnx(yolov5n, folder / f"{head}-dynamic.onnx", options)
    return files


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def _torch(model, x, head):
    model.head_mode = head
    try:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    finally:
        model.head_mode = "decoded"


def test_sigmoid_head_equals_pytorch(yolov5n, bus_input, exported):
    got, want = _run(exported["sigmoid", "static"], bus_input), _torch(yolov5n, bus_input, "sigmoid")
    assert got.shape == want.shape == (1, 25200, 85)
    assert np.abs(got - want).max() <= SCORE_TOL


def test_decoded_head_equals_pytorch(yolov5n, bus_input, exported):
    got, want = _run(exported["decoded", "static"], bus_input), _torch(yolov5n, bus_input, "decoded")
    assert np.abs(got[..., 4:] - want[..., 4:]).max() <= SCORE_TOL
    assert np.abs(got[..., :4] - want[..., :4]).max() <= BOX_TOL_PX
    assert np.abs(got[..., :4] - want[..., :4]).max() / np.abs(want[..., :4]).max() <= BOX_TOL_REL


@pytest.mark.parametrize("kind, shape", [("static", None), ("dynamic", (2, 3, 320, 416))])
def test_host_decode_of_the_sigmoid_head_equals_the_decoded_head(yolov5n, bus_input, exported, kind, shape):
    """What INT8 bundles do on the host (grid offsets, strides, anchors per level) is the graph's own decode.

    The non-square dynamic input (40x52 cells at stride 8) catches a swapped x/y grid as well as a wrong offset.
    """
    x = bus_input if shape is None else np.random.default_rng(0).random(shape, dtype=np.float32)
    head = yolov5n.describe()
    host = decode_sigmoid_head(_run(exported["sigmoid", kind], x), x.shape[2:], head["strides"], head["anchors"])
    graph = _run(exported["decoded", kind], x)
    assert host.shape == graph.shape
    assert np.abs(host[..., :4] - graph[..., :4]).max() <= HOST_DECODE_TOL_PX
    assert np.abs(host[..., 4:] - graph[..., 4:]).max() <= HOST_DECODE_TOL_PX


def test_graph_is_folded_simplified_and_tagged(yolov5n, bus_input, tmp_path):
    path = export_onnx(yolov5n, tmp_path / "m.onnx", ExportOptions(opset=13))
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops
    # simplified: the shape arithmetic torch.onnx writes for the grids is folded into constants ...
    raw = export_onnx(yolov5n, tmp_path / "raw.onnx", ExportOptions(opset=13, simplify=False))
    raw_ops = [n.op_type for n in onnx.load(str(raw)).graph.node]
    folded = {"Constant", "ConstantOfShape", "Shape", "Gather", "Unsqueeze", "Expand", "Equal", "Where"}
    assert folded & set(raw_ops) and not folded & set(ops), sorted(set(ops))
    assert len(ops) < 0.8 * len(raw_ops) and ops.count("Conv") == raw_ops.count("Conv") == 60
    # ... without changing what it computes
    np.testing.assert_allclose(_run(path, bus_input), _run(raw, bus_input), atol=1e-4, rtol=0)
    assert graph.opset_import[0].version == 13
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 640, 640]
    meta = read_metadata(path)
    assert meta["names"][0] == "person" and len(meta["names"]) == 80
    assert meta["strides"] == [8, 16, 32] and meta["stride"] == "32"
    assert meta["imgsz"] == [640, 640] and meta["anchors"][2][-2:] == [373.0, 326.0]
    assert meta["head"] == "decoded" and meta["edgeyolo_version"]
    assert not list(tmp_path.glob(".export-*")), "temporary files left behind"


def test_dynamic_batch_and_shape(yolov5n, exported):
    x = np.random.default_rng(0).random((2, 3, 320, 416), dtype=np.float32)
    got = _run(exported["decoded", "dynamic"], x)
    assert got.shape == (2, (40 * 52 + 20 * 26 + 10 * 13) * 3, 85)
    np.testing.assert_allclose(got[..., 4:], _torch(yolov5n, x, "decoded")[..., 4:], atol=SCORE_TOL, rtol=0)


def test_imgsz_not_a_stride_multiple_is_rounded_up_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeyolo"):
        assert check_imgsz(630, 32) == (640, 640)
    assert "multiple of the max stride" in caplog.text
    assert check_imgsz((480, 640), 32) == (480, 640)
