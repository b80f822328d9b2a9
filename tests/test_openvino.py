"""The OpenVINO backend: FP32/FP16/INT8 builds, parity with cpu-fp32, INT8 accuracy, engine options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from conftest import assert_calibrated_on_coco128  # noqa: E402
from detection_match import unmatched  # noqa: E402

from edgeyolo.backends.openvino import compile_properties, decode_node_names  # noqa: E402
from edgeyolo.errors import EdgeYoloError  # noqa: E402
from edgeyolo.runtime import load  # noqa: E402

# Parity with cpu-fp32 on the sample images, each bound just above what was measured (same counts throughout):
# FP32: boxes within 3e-4 px, scores within 1.6e-6 (float32 reordering only).
FP32_BOX_PX, FP32_SCORE = 2e-3, 1e-5
# FP16 weights (compute stays f32 on CPU): IoU >= 0.9955, boxes within 0.19 px, scores within 2.3e-3.
FP16_IOU, FP16_BOX_PX, FP16_SCORE = 0.99, 0.4, 5e-3
# INT8 (NNCF), detections scoring >= 0.5: IoU >= 0.963, scores within 0.035 calibrated on all 128 coco128
# images; 0.949 and 0.036 on the edit loop's 32 (conftest.QUICK_CALIBRATION_IMAGES).
INT8_MIN_SCORE, INT8_IOU, INT8_SCORE_TOL = 0.5, 0.93, 0.05
# FP16 accuracy on coco-val-500: measured +0.01 mAP50-95 points vs cpu-fp32.
FP16_MAX_MAP_DIFF_POINTS = 0.1




# --------------------------------------------------------------------------- parity
def test_fp32_matches_cpu_fp32(cpu_fp32_bundle, ov_fp32_bundle, images):
    reference, candidate = load(cpu_fp32_bundle), load(ov_fp32_bundle)
    assert candidate.info["backend"] == "openvino" and candidate.info["inference_precision"] == "f32"
    for image in images:
        ref, got = reference.detect(image), candidate.detect(image)
        assert len(ref) == len(got) > 0
        assert unmatched(ref, got, box_tol_px=FP32_BOX_PX, score_tol=FP32_SCORE) == []


def test_int8_matches_cpu_fp32_within_stated_tolerance(cpu_fp32_bundle, ov_int8_bundle, images):
    reference, candidate = load(cpu_fp32_bundle), load(ov_int8_bundle)
    for image in images:
        ref, got = reference.detect(image), candidate.detect(image)
        assert (ref.confidence >= INT8_MIN_SCORE).any()
        assert unmatched(ref, got, min_iou=INT8_IOU, score_tol=INT8_SCORE_TOL, min_score=INT8_MIN_SCORE) == []


def test_int8_is_really_quantized(ov_int8_bundle, ov_fp32_bundle):
    manifest = json.loads((ov_int8_bundle / "manifest.json").read_text())
    core = ov.Core()
    types = {op.get_type_name() for op in core.read_model(str(ov_int8_bundle / "model.xml")).get_ops()}
    assert "FakeQuantize" in types
    assert (ov_int8_bundle / "model.bin").stat().st_size < 0.4 * (ov_fp32_bundle / "model.bin").stat().st_size
    assert manifest["output"]["head"] == "sigmoid"
    assert manifest["backend"]["nncf_version"]


def test_int8_manifest_records_calibration(ov_int8_bundle, int8_calibration):
    manifest = json.loads((ov_int8_bundle / "manifest.json").read_text())
    calib = manifest["calibration"]
    assert calib["method"] == "nncf-ptq-mixed-histogram-fast-bias-correction"
    assert calib["images"] == len(int8_calibration) and calib["skipped"] == 0
    assert calib["images_sha256"] == int8_calibration.describe()["images_sha256"]
    assert calib["preprocess"] == manifest["preprocess"]
    assert manifest["backend"]["options"]["preset"] == "mixed"


@pytest.mark.slow
def test_int8_accuracy_within_half_a_point_of_cpu_fp32(cpu_fp32_coco_val_result, ov_int8_bundle,
                                                       coco_val_dataset):
    """The issue's bar on coco-val-500, calibrated on coco128 (disjoint sets)."""
    from edgeyolo.evaluate import evaluate

    reference = cpu_fp32_coco_val_result
    assert_calibrated_on_coco128(ov_int8_bundle)
    int8 = evaluate(load(ov_int8_bundle), coco_val_dataset)
    drop = (reference.map50_95 - int8.map50_95) * 100
    print(f"cpu-fp32 {reference.map50_95 * 100:.2f}  intel-cpu-int8 {int8.map50_95 * 100:.2f}  drop {drop:.2f}")
    assert drop <= 0.5


# --------------------------------------------------------------------------- FP16
def test_fp16_halves_the_weights_and_keeps_detections(intel_fp16_bundle, cpu_fp32_bundle, ov_fp32_bundle, images):
    ratio = (intel_fp16_bundle / "model.bin").stat().st_size / (ov_fp32_bundle / "model.bin").stat().st_size
    assert 0.45 < ratio < 0.55
    reference, candidate = load(cpu_fp32_bundle), load(intel_fp16_bundle)
    for image in images:
        ref, got = reference.detect(image), candidate.detect(image)
        assert len(ref) == len(got)
        assert unmatched(ref, got, min_iou=FP16_IOU, box_tol_px=FP16_BOX_PX, score_tol=FP16_SCORE) == []


@pytest.mark.slow
def test_fp16_accuracy_equals_fp32(cpu_fp32_coco_val_result, intel_fp16_bundle, coco_val_dataset):
    """The README's FP16 rows on coco-val-500 (arm-fp16 computes the same as this: see test_tflite)."""
    from edgeyolo.evaluate import evaluate

    fp16 = evaluate(load(intel_fp16_bundle), coco_val_dataset)
    print(f"cpu-fp32 {cpu_fp32_coco_val_result.map50_95 * 100:.2f}  intel-cpu-fp16 {fp16.map50_95 * 100:.2f}")
    assert abs(fp16.map50_95 - cpu_fp32_coco_val_result.map50_95) * 100 <= FP16_MAX_MAP_DIFF_POINTS


# --------------------------------------------------------------------------- decode kept out of INT8
def test_decode_nodes_are_exactly_the_head_decode(exported_onnx):
    decoded = ov.convert_model(str(exported_onnx["decoded"]))
    sigmoid = ov.convert_model(str(exported_onnx["sigmoid"]))
    names = set(decode_node_names(decoded))
    ops = {op.get_friendly_name(): op.get_type_name() for op in decoded.get_ordered_ops()}
    final = decoded.get_results()[0].input_value(0).get_node().get_friendly_name()
    assert final in names
    assert {ops[n] for n in names} >= {"Reshape", "Sigmoid", "Multiply", "Add", "Power", "Concat"}
    assert "Convolution" not in {ops[n] for n in names}
    # the Detect module (model.24) and nodes the converter named itself; nothing of the backbone or neck
    assert not [n for n in names if n.startswith("/model.") and not n.startswith("/model.24/")]
    # the sigmoid head has only the per-level reshape/sigmoid/concat left to keep out
    assert len(decode_node_names(sigmoid)) < len(names)


# --------------------------------------------------------------------------- engine options
def test_threads_and_performance_hint(ov_fp32_bundle, monkeypatch):
    monkeypatch.delenv("EDGEYOLO_THREADS", raising=False)
    one = load(ov_fp32_bundle, threads=1)
    assert one.info["threads"] == 1 and one.info["performance_hint"] == "LATENCY"
    throughput = load(ov_fp32_bundle, performance_hint="throughput")
    assert throughput.info["performance_hint"] == "THROUGHPUT"
    monkeypatch.setenv("EDGEYOLO_THREADS", "1")
    assert load(ov_fp32_bundle).info["threads"] == 1
    with pytest.raises(EdgeYoloError, match="LATENCY, THROUGHPUT"):
        compile_properties({}, 0, "fastest")


def test_infer_returns_a_fresh_array(ov_fp32_bundle, images):
    detector = load(ov_fp32_bundle)
    from edgeyolo.runtime import letterbox

    assert detector.takes_image  # the engine takes the uint8 letterbox itself
    first_input, second_input = (letterbox(image, detector.letterbox)[0][None] for image in images[:2])
    first = detector.engine.infer(first_input)
    kept = first.copy()
    detector.engine.infer(second_input)
    np.testing.assert_array_equal(first, kept)
    assert first.shape == (1, 25200, 85) and first.dtype == np.float32


def test_runtime_never_imports_torch(ov_int8_bundle, sample_images):
    code = (
        "import sys; from edgeyolo.runtime import load; "
        f"d = load({str(ov_int8_bundle)!r}); print(len(d.detect({str(sample_images[0])!r}))); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0


def test_missing_openvino_names_the_extra(yolov5n_pt, tmp_path, monkeypatch):
    from edgeyolo.cli import cli

    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is absent
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["build", str(yolov5n_pt), "-t", "intel-cpu-fp32", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "pip install 'edgeyolo[openvino]'" in result.output.replace("\n", "")
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_benchmark_script_interleaves_engines(cpu_fp32_bundle, ov_fp32_bundle, ov_int8_bundle, sample_images,
                                               tmp_path, capsys, monkeypatch):
    """A tiny run of benchmarks/bench_openvino.py over the session's bundles (nothing rebuilt)."""
    import importlib
    from pathlib import Path

    # importable by name, so the spawned worker processes can import it too
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_openvino")
    for name, bundle in [("cpu-fp32", cpu_fp32_bundle), ("intel-cpu-fp32", ov_fp32_bundle),
                         ("intel-cpu-int8", ov_int8_bundle)]:
        (tmp_path / name).symlink_to(bundle)
    bench.main(["--out", str(tmp_path), "--images", str(sample_images[0].parent), "--rounds", "2", "--iters", "2",
                "--warmup", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["build_seconds"] == {}
    assert set(report["results"]) == {"intel-cpu-fp32", "intel-cpu-int8", "cpu-fp32"}
    for result in report["results"].values():
        assert result["iters"] == 4 and len(result["fps_per_round"]) == 2 and result["fps"] > 0
        assert result["peak_rss_mb"] >= result["engine_rss_growth_mb"] > 0
    assert report["results"]["intel-cpu-int8"]["info"]["backend"] == "openvino"
    assert set(report["ratios"]) == {"int8_over_fp32", "ov_fp32_over_ort_fp32"}
