"""Sensitivity analysis and --keep-float: the proxy, the ranking, kept layers in each backend's graph.

Everything runs YOLOv5n at 160x160 on a handful of coco128 images, so it stays fast.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from edgeyolo.errors import EdgeYoloError
from edgeyolo.quantize import QuantizeSettings, kept_nodes, layer_of, layers, summarize_qdq
from edgeyolo.sensitivity import (
    most_sensitive,
    qdq_sensitivity,
    resolve_keep_float,
    weighted_error,
    write_report,
)

pytest.importorskip("onnxruntime")

SIZE = 160


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    """cpu-int8 at 160x160 with every stage quantisable (a user's own target file)."""
    from edgeyolo.targets import load_target

    base = load_target("cpu-int8")
    path = tmp_path_factory.mktemp("targets") / "small-int8.toml"
    path.write_text(f'name = "small-int8"\nbackend = "onnxruntime"\nprecision = "int8"\nimgsz = {SIZE}\n'
                    f'head = "sigmoid"\n[calibration]\nmethod = "{base.calibration.get("method", "mean-minmax")}"\n'
                    'float_from_stride = 0\nkeep_float = ["model.1"]\n')
    return load_target(path)


@pytest.fixture(scope="module")
def small_calibration(yolov5n_pt, coco128, small_target):
    from edgeyolo.build import prepare_calibration

    return prepare_calibration(yolov5n_pt, small_target, coco128 / "images", size=4)


@pytest.fixture(scope="module")
def small_onnx(yolov5n_pt, tmp_path_factory):
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model

    out = tmp_path_factory.mktemp("sens") / "small.onnx"
    return export_onnx(load_model(yolov5n_pt).model, out, ExportOptions(imgsz=(SIZE, SIZE), head="sigmoid"))


# --------------------------------------------------------------------------- the proxy
def test_weighted_error_counts_rows_by_their_fp32_objectness():
    reference = np.zeros((1, 3, 6), np.float32)
    reference[0, 0, 4] = 1.0  # one object row; the other two are background
    candidate = reference.copy()
    candidate[0, 1, :] = 0.5  # noise on a background row only
    assert weighted_error(reference, candidate) == 0.0
    candidate[0, 0, 0] = 0.6  # an error on the object row
    assert weighted_error(reference, candidate) == pytest.approx(0.36 / 6)
    assert weighted_error(reference, reference) == 0.0


# --------------------------------------------------------------------------- layer names
def test_layers_and_kept_nodes(small_onnx):
    model = onnx.load(str(small_onnx))
    names = layers(model)
    assert names[0] == "model.0" and "model.24" in names and len(names) == 25
    assert layer_of("/model.8/cv1/conv/Conv") == "model.8"
    kept = kept_nodes(model, ["model.1"])
    assert kept == ["/model.1/conv/Conv", "/model.1/act/Sigmoid", "/model.1/act/Mul"]
    assert kept_nodes(model, ["/model.2/cv1/conv/Conv"]) == ["/model.2/cv1/conv/Conv"]
    with pytest.raises(EdgeYoloError, match="no layer named model.99"):
        kept_nodes(model, ["model.99"])
    with pytest.raises(EdgeYoloError, match="keep_float"):
        QuantizeSettings(keep_float="model.1")


# --------------------------------------------------------------------------- ranking
def test_ranking_is_by_error_and_a_float_layer_changes_the_output(small_onnx, small_calibration):
    inputs = list(small_calibration.batches("NCHW", 1))[:2]
    report = qdq_sensitivity(small_onnx, small_calibration, inputs, QuantizeSettings(float_from_stride=0),
                             candidates=["model.0", "model.1", "model.11"])
    assert report.baseline_error > 0
    errors = [s.error for s in report.scores]
    assert errors == sorted(errors)
    for s in report.scores:
        assert s.recovered == pytest.approx((report.baseline_error - s.error) / report.baseline_error)
    by_name = {s.layer: s for s in report.scores}
    # model.11 is a lone Upsample: no weights, no new rounding; keeping a convolution float does change the output
    assert by_name["model.11"].error == pytest.approx(report.baseline_error, rel=1e-6)
    assert by_name["model.0"].error != pytest.approx(report.baseline_error, rel=1e-6)
    assert set(most_sensitive(report, 3)) <= {"model.0", "model.1"}
    # model.0: a 6x6 stride-2 conv, 3 -> 16 channels at 80x80 of 160x160 (7.9 % of YOLOv5n's MACs)
    assert by_name["model.0"].macs_share == pytest.approx(80 * 80 * 16 * 3 * 36 / conv_total(small_onnx))
    assert by_name["model.11"].macs_share == 0.0


def conv_total(path) -> int:
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return sum(int(np.prod(dims[n.output[0]][2:] + shapes[n.input[1]])) for n in model.graph.node if n.op_type == "Conv")


def test_report_files(small_onnx, small_calibration, tmp_path):
    inputs = list(small_calibration.batches("NCHW", 1))[:1]
    report = qdq_sensitivity(small_onnx, small_calibration, inputs, QuantizeSettings(float_from_stride=0),
                             candidates=["model.1", "model.2"])
    json_path, md_path, png_path = write_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert [row["layer"] for row in data["layers"]] == report.ranked()
    assert "| 1 | " + report.ranked()[0] + " |" in md_path.read_text()
    assert png_path.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- --keep-float
def test_resolve_keep_float(small_target, small_calibration, yolov5n_pt):
    assert resolve_keep_float(None, yolov5n_pt, small_target, small_calibration) is small_target
    assert resolve_keep_float("auto", yolov5n_pt, small_target, small_calibration).calibration["keep_float"] == [
        "model.1"]
    assert resolve_keep_float("none", yolov5n_pt, small_target, small_calibration).calibration["keep_float"] == []
    named = resolve_keep_float("model.2, model.4", yolov5n_pt, small_target, small_calibration)
    assert named.calibration["keep_float"] == ["model.2", "model.4"]
    with pytest.raises(EdgeYoloError, match="--keep-float"):
        resolve_keep_float(",", yolov5n_pt, small_target, small_calibration)


def test_keep_float_count_takes_the_top_of_a_ranking_made_on_the_calibration_images(
        small_target, small_calibration, yolov5n_pt, monkeypatch):
    import edgeyolo.sensitivity as sens

    seen = {}

    def fake_ranking(weights, target, calibration, inputs, *_):
        seen["inputs"] = len(inputs)
        scores = [sens.LayerScore("model.4", 1.0, 0.5, 3), sens.LayerScore("model.9", 1.5, 0.2, 3),
                  sens.LayerScore("model.11", 2.0, 0.0, 1)]
        return sens.SensitivityReport(baseline_error=2.0, scores=scores, images=len(inputs), settings={})

    monkeypatch.setattr(sens, "sensitivity_for", fake_ranking)
    assert resolve_keep_float("1", yolov5n_pt, small_target, small_calibration).calibration["keep_float"] == ["model.4"]
    # a layer that recovers nothing is never kept, whatever N asks
    assert resolve_keep_float("5", yolov5n_pt, small_target, small_calibration).calibration["keep_float"] == [
        "model.4", "model.9"]
    assert seen["inputs"] == min(len(small_calibration), sens.BUILD_TIME_IMAGES)


def test_keep_float_is_refused_for_float_targets(yolov5n_pt, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    result = CliRunner().invoke(cli, ["build", str(yolov5n_pt), "-t", "cpu-fp32", "--keep-float", "2",
                                      "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--keep-float is for INT8 targets" in result.output
    assert not (tmp_path / "b").exists()


def _float_inputs(model, node_name: str) -> bool:
    """True when ``node_name`` reads no dequantized tensor (it runs in float)."""
    return node_name in summarize_qdq(model)["float"]


def test_qdq_build_leaves_kept_layers_without_qdq(yolov5n_pt, small_target, small_calibration, tmp_path):
    from edgeyolo.build import build_bundle
    from edgeyolo.bundle import load_bundle

    bundle = load_bundle(build_bundle(yolov5n_pt, small_target, tmp_path / "b", calibration=small_calibration).path)
    model = onnx.load(str(bundle.file("onnx")))
    assert _float_inputs(model, "/model.1/conv/Conv")
    assert not _float_inputs(model, "/model.2/cv1/conv/Conv")
    assert bundle.manifest["calibration"]["keep_float"] == ["model.1"]
    assert bundle.manifest["backend"]["quantization"]["keep_float"] == ["model.1"]


@pytest.mark.slow  # an engine build of its own; CI's full run keeps it
def test_openvino_build_leaves_kept_layers_out_of_int8(yolov5n_pt, small_calibration, tmp_path):
    pytest.importorskip("nncf")
    import openvino as ov

    from edgeyolo.build import build_bundle
    from edgeyolo.targets import load_target

    target = load_target("intel-cpu-int8")
    target = dataclasses.replace(target, imgsz=(SIZE, SIZE), calibration={"keep_float": ["model.1"]})
    bundle = build_bundle(yolov5n_pt, target, tmp_path / "ov", calibration=small_calibration)
    model = ov.Core().read_model(str(bundle.path / "model.xml"))

    def fed_by_fake_quantize(name):
        op = next(o for o in model.get_ops() if o.get_friendly_name() == name)
        return op.input_value(0).get_node().get_type_name() == "FakeQuantize"

    assert not fed_by_fake_quantize("/model.1/conv/Conv/WithoutBiases")  # OpenVINO's name for the convolution
    assert fed_by_fake_quantize("/model.2/cv1/conv/Conv/WithoutBiases")
    assert bundle.manifest["calibration"]["keep_float"] == ["model.1"]
    with pytest.raises(EdgeYoloError, match="no layer named model.99"):
        build_bundle(yolov5n_pt, dataclasses.replace(target, calibration={"keep_float": ["model.99"]}),
                     tmp_path / "bad", calibration=small_calibration)
    assert not (tmp_path / "bad").exists()


def test_tflite_refuses_keep_float():
    from edgeyolo.backends.tflite.convert import check_target
    from edgeyolo.targets import load_target

    target = load_target("arm-int8")
    check_target(target)
    with pytest.raises(EdgeYoloError, match="onnx2tf cannot leave single layers in float"):
        check_target(dataclasses.replace(target, calibration={"keep_float": ["model.1"]}))


# --------------------------------------------------------------------------- the command
def test_sensitivity_command(yolov5n_pt, coco128, small_target, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    args = ["sensitivity", str(yolov5n_pt), "--target", small_target.path, "--calib", str(coco128 / "images"),
            "--calib-size", "4", "--val", str(coco128 / "images"), "--limit", "1", "--layers", "model.1,model.2",
            "-o", str(tmp_path / "s")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert sorted(row["layer"] for row in data["layers"]) == ["model.1", "model.2"]
    bad = CliRunner().invoke(cli, args[:-2] + ["--layers", "model.99", "-o", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "no layer named model.99" in bad.output
    fp32 = CliRunner().invoke(cli, ["sensitivity", str(yolov5n_pt), "--target", "cpu-fp32", "--calib", "x",
                                    "--val", "x"])
    assert fp32.exit_code == 2 and "needs an INT8 target" in fp32.output
