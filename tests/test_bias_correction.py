"""Bias correction of the Q/DQ graph (YOLOv5n at 160x160, 4 coco128 images)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from edgeyolo.errors import EdgeYoloError
from edgeyolo.quantize import (
    QuantizeSettings,
    calibrate_ranges,
    correct_biases,
    onnx_with_outputs,
    write_qdq,
)

ort = pytest.importorskip("onnxruntime")

SIZE = 160
FIRST_CONV = "/model.0/conv/Conv"


@pytest.fixture(scope="module")
def small_onnx(yolov5n_pt, tmp_path_factory):
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model

    out = tmp_path_factory.mktemp("bias") / "small.onnx"
    return export_onnx(load_model(yolov5n_pt).model, out, ExportOptions(imgsz=(SIZE, SIZE), head="sigmoid"))


@pytest.fixture(scope="module")
def small_calibration(yolov5n_pt, coco128):
    from edgeyolo.build import prepare_calibration
    from edgeyolo.targets import load_target

    target = dataclasses.replace(load_target("cpu-int8"), imgsz=(SIZE, SIZE))
    return prepare_calibration(yolov5n_pt, target, coco128 / "images", size=4)


def _first_conv_mean_error(model, reference, calibration) -> np.ndarray:
    """Per-channel mean of (Q/DQ - FP32) at the first convolution's output: only its own INT8 error."""
    name = next(n.output[0] for n in reference.graph.node if n.name == FIRST_CONV)
    run = lambda m: [ort.InferenceSession(onnx_with_outputs(m, [name]).SerializeToString())  # noqa: E731
                     .run([name], {"images": x})[0].mean(axis=(0, 2, 3)) for x in calibration.batches("NCHW", 1)]
    return np.mean(run(model), axis=0) - np.mean(run(reference), axis=0)


def test_bias_correction_removes_a_convolutions_own_mean_error(small_onnx, small_calibration):
    settings = QuantizeSettings(method="mean-minmax", float_from_stride=0)
    qdq, _ = write_qdq(small_onnx, calibrate_ranges(small_onnx, small_calibration, settings), settings)
    reference = onnx.load(str(small_onnx))
    before = _first_conv_mean_error(qdq, reference, small_calibration)
    biases = {i.name: numpy_helper.to_array(i).copy() for i in qdq.graph.initializer if i.data_type == TensorProto.INT32}
    corrected = correct_biases(qdq, small_onnx, small_calibration)
    assert corrected == sum(1 for n in qdq.graph.node if n.op_type == "Conv")  # every conv reads a Q/DQ input
    after = _first_conv_mean_error(qdq, reference, small_calibration)
    assert np.abs(after).mean() < 0.25 * np.abs(before).mean(), (before, after)
    changed = [name for name, value in biases.items()
               if not np.array_equal(value, numpy_helper.to_array(next(i for i in qdq.graph.initializer
                                                                        if i.name == name)))]
    assert len(changed) > 30  # int32 biases moved, in their own steps (the weights and scales did not)


def test_bias_correction_setting():
    assert QuantizeSettings(bias_correction=True).describe() == "mean-minmax, bias correction"
    assert QuantizeSettings().bias_correction is False  # a target without the key keeps its old graph
    with pytest.raises(EdgeYoloError, match="bias_correction"):
        QuantizeSettings(bias_correction="fast")


def test_bias_correction_key_in_a_target_file(tmp_path):
    from edgeyolo.targets import load_target

    path = tmp_path / "own-int8.toml"
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n[calibration]\nbias_correction = 1\n')
    with pytest.raises(EdgeYoloError, match="bias_correction"):
        load_target(path)
    path.write_text(path.read_text().replace("= 1", "= true"))
    assert QuantizeSettings.from_target(load_target(path)).bias_correction is True


def test_sensitivity_measures_the_bias_corrected_graph(small_onnx, small_calibration):
    """With bias correction on, the ranking's all-INT8 baseline is exactly the graph a build writes."""
    from edgeyolo.sensitivity import OnnxRunner, proxy_error, qdq_sensitivity

    inputs = list(small_calibration.batches("NCHW", 1))[:2]
    settings = QuantizeSettings(float_from_stride=0, bias_correction=True)
    report = qdq_sensitivity(small_onnx, small_calibration, inputs, settings, candidates=["model.1"])
    plain = qdq_sensitivity(small_onnx, small_calibration, inputs, dataclasses.replace(settings, bias_correction=False),
                            candidates=["model.1"])
    built, _ = write_qdq(small_onnx, calibrate_ranges(small_onnx, small_calibration, settings), settings)
    correct_biases(built, small_onnx, small_calibration)
    run = OnnxRunner(inputs)
    assert report.baseline_error == pytest.approx(proxy_error(run(small_onnx), run(built)), rel=1e-6)
    assert report.baseline_error != pytest.approx(plain.baseline_error, rel=1e-3)
    assert report.settings["method"] == "mean-minmax, bias correction"
