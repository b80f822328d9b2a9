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
from edgeyolo.runtime.preprocess import LetterboxSettings, preprocess


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_checkpoint(yolov5n_pt).model


@pytest.fixture(scope="module")
def bus_input(sample_images):
    return preprocess(cv2.imread(str(sample_images[0])), LetterboxSettings())[0]


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


def test_sigmoid_head_equals_pytorch_within_1e3(yolov5n, bus_input, tmp_path):
    path = export_onnx(yolov5n, tmp_path / "m.onnx", ExportOptions(head="sigmoid"))
    got, want = _run(path, bus_input), _torch(yolov5n, bus_input, "sigmoid")
    assert got.shape == want.shape == (1, 25200, 85)
    assert np.abs(got - want).max() <= 1e-3


def test_decoded_head_equals_pytorch(yolov5n, bus_input, tmp_path):
    """Scores within 1e-3; boxes (pixels up to 640, wh = (2s)^2 * anchor) within float32 noise."""
    path = export_onnx(yolov5n, tmp_path / "m.onnx")
    got, want = _run(path, bus_input), _torch(yolov5n, bus_input, "decoded")
    assert np.abs(got[..., 4:] - want[..., 4:]).max() <= 1e-3
    assert np.abs(got[..., :4] - want[..., :4]).max() <= 1e-2
    assert np.abs(got[..., :4] - want[..., :4]).max() / np.abs(want[..., :4]).max() <= 1e-5


def test_graph_is_folded_simplified_and_tagged(yolov5n, tmp_path):
    path = export_onnx(yolov5n, tmp_path / "m.onnx", ExportOptions(opset=13))
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert "BatchNormalization" not in ops
    assert graph.opset_import[0].version == 13
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 640, 640]
    meta = read_metadata(path)
    assert meta["names"][0] == "person" and len(meta["names"]) == 80
    assert meta["strides"] == [8, 16, 32] and meta["stride"] == "32"
    assert meta["imgsz"] == [640, 640] and meta["anchors"][2][-2:] == [373.0, 326.0]
    assert meta["head"] == "decoded" and meta["edgeyolo_version"]
    assert not list(tmp_path.glob(".export-*")), "temporary files left behind"


def test_dynamic_batch_and_shape(yolov5n, tmp_path):
    path = export_onnx(yolov5n, tmp_path / "d.onnx", ExportOptions(dynamic_shape=True))
    x = np.random.default_rng(0).random((2, 3, 320, 416), dtype=np.float32)
    got = _run(path, x)
    assert got.shape == (2, (40 * 52 + 20 * 26 + 10 * 13) * 3, 85)
    np.testing.assert_allclose(got[..., 4:], _torch(yolov5n, x, "decoded")[..., 4:], atol=1e-3)


def test_imgsz_not_a_stride_multiple_is_rounded_up_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeyolo"):
        assert check_imgsz(630, 32) == (640, 640)
    assert "multiple of the max stride" in caplog.text
    assert check_imgsz((480, 640), 32) == (480, 640)
