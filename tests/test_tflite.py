"""The TFLite backend: onnx2tf conversion, LiteRT engines, parity with cpu-fp32, full-integer INT8, failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("onnx2tf")
pytest.importorskip("tensorflow")

from edgeyolo.backends.tflite import convert  # noqa: E402
from edgeyolo.backends.tflite.engine import dequantize, quantize  # noqa: E402
from edgeyolo.build import build_bundle  # noqa: E402
from edgeyolo.bundle import BundleWriter  # noqa: E402
from edgeyolo.errors import EdgeYoloError  # noqa: E402
from edgeyolo.runtime import load  # noqa: E402
from edgeyolo.targets import Target, load_target  # noqa: E402
from detection_match import iou

# FP32/FP16 parity: every cpu-fp32 detection matched with the same class, IoU >= 0.99, score within 0.01.
FLOAT_IOU, FLOAT_SCORE_TOL = 0.99, 0.01
# INT8 parity, stated: every cpu-fp32 detection scoring >= 0.5 on the sample images is found by
# arm-int8 with the same class, IoU >= 0.9 and a score within 0.1.
INT8_MIN_SCORE, INT8_IOU, INT8_SCORE_TOL = 0.5, 0.9, 0.1
# The bar on coco-val-500 (calibrated on coco128): within 1.0 mAP50-95 point of cpu-fp32.
INT8_MAX_DROP = 1.0


def unmatched(reference, candidate, min_iou: float, score_tol: float, min_score: float = 0.0) -> list:
    """Reference detections (score >= min_score) with no same-class candidate at min_iou and score_tol."""
    missing = []
    for box, score, cls in zip(reference.xyxy, reference.confidence, reference.class_id):
        if score < min_score:
            continue
        same = candidate.class_id == cls
        ious = iou(box, candidate.xyxy[same]) if same.any() else np.zeros(0)
        close = np.abs(candidate.confidence[same] - score) <= score_tol
        if not np.any((ious >= min_iou) & close):
            missing.append((int(cls), float(score), box.round(1).tolist()))
    return missing


def test_fp32_matches_cpu_fp32(cpu_fp32_bundle, arm_fp32_bundle, images):
    reference, arm = load(cpu_fp32_bundle), load(arm_fp32_bundle)
    assert arm.engine.info["backend"] == "tflite"
    for image in images:
        expected, got = reference.detect(image), arm.detect(image)
        assert len(got) == len(expected) >= 3
        assert unmatched(expected, got, FLOAT_IOU, FLOAT_SCORE_TOL) == []


def test_int8_matches_cpu_fp32_within_stated_tolerance(cpu_fp32_bundle, arm_int8_bundle, images):
    reference, arm = load(cpu_fp32_bundle), load(arm_int8_bundle)
    for image in images:
        expected, got = reference.detect(image), arm.detect(image)
        assert unmatched(expected, got, INT8_IOU, INT8_SCORE_TOL, INT8_MIN_SCORE) == []


def test_int8_is_full_integer_with_a_sigmoid_head(arm_int8_bundle, coco128_calibration):
    from ai_edge_litert.interpreter import Interpreter

    detector = load(arm_int8_bundle)
    manifest = detector.bundle.manifest
    assert manifest["input"]["layout"] == "NHWC" and manifest["input"]["shape"] == [1, 640, 640, 3]
    assert manifest["input"]["tensor_dtype"] == "int8"
    assert manifest["input"]["quantization"]["scale"] == pytest.approx(1 / 255)
    assert manifest["output"]["head"] == "sigmoid" and manifest["output"]["tensor_dtype"] == "int8"
    assert manifest["calibration"]["method"] == convert.CALIBRATION_METHOD
    assert manifest["calibration"]["images"] == len(coco128_calibration)
    interpreter = Interpreter(model_path=str(detector.bundle.file("engine")))
    dtypes = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert "float32" not in dtypes, "full-integer models have no float tensors"
    assert detector.engine.info["input_dtype"] == "int8"


@pytest.mark.slow
def test_int8_accuracy_within_a_point_of_cpu_fp32(cpu_fp32_bundle, arm_int8_bundle, coco_val):
    from edgeyolo.datasets import load_dataset
    from edgeyolo.evaluate import evaluate

    dataset = load_dataset(coco_val)
    reference = evaluate(load(cpu_fp32_bundle), dataset)
    int8 = evaluate(load(arm_int8_bundle), dataset)
    drop = (reference.map50_95 - int8.map50_95) * 100
    print(f"cpu-fp32 {reference.map50_95 * 100:.2f}  arm-int8 {int8.map50_95 * 100:.2f}  drop {drop:.2f}")
    assert drop <= INT8_MAX_DROP


def test_fp16_halves_the_file_and_keeps_detections(yolov5n_pt, cpu_fp32_bundle, arm_fp32_bundle, images, tmp_path):
    fp16 = build_bundle(yolov5n_pt, "arm-fp16", tmp_path / "arm-fp16")
    fp32_size = (arm_fp32_bundle / "model.tflite").stat().st_size
    assert (fp16.path / "model.tflite").stat().st_size < 0.6 * fp32_size
    reference, arm = load(cpu_fp32_bundle), load(fp16.path)
    for image in images:
        assert unmatched(reference.detect(image), arm.detect(image), FLOAT_IOU, FLOAT_SCORE_TOL) == []


def test_running_an_arm_bundle_imports_neither_tensorflow_nor_torch(arm_int8_bundle, sample_images):
    code = textwrap.dedent(f"""
        import sys
        import edgeyolo
        detector = edgeyolo.load({str(arm_int8_bundle)!r}, threads=1)
        assert len(detector.detect({str(sample_images[0])!r})) >= 3
        print("THREADS", detector.engine.info["threads"])
        print("IMPORTED", sorted(m for m in ("tensorflow", "tf_keras", "keras", "onnx2tf", "torch", "onnx")
                                 if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
    assert "THREADS 1" in result.stdout


def test_conversion_failure_is_one_line_with_the_log_kept_and_no_bundle(tmp_path):
    """A graph onnx2tf cannot convert (an operator it lacks) fails inside the real converter."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["hidden"]),
         helper.make_node("NoSuchOp", ["hidden"], ["output0"], domain="edgeyolo.test")],
        "unconvertible", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 32, 32])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("edgeyolo.test", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx_path = tmp_path / "unconvertible.onnx"
    onnx.save(model, str(onnx_path))
    original = onnx_path.read_bytes()
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(EdgeYoloError) as failure:
        with BundleWriter(dest) as writer:
            convert.build(onnx_path, load_target("arm-fp32"), writer.tmp, None)
    message = str(failure.value)
    assert "\n" not in message
    assert "NoSuchOp OP is not yet implemented" in message
    log_path = dest.parent / "bundle.tflite-convert.log"
    assert str(log_path) in message and "NoSuchOp" in log_path.read_text()
    assert not dest.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [log_path.name]
    assert onnx_path.read_bytes() == original, "the converter must work on a copy"


def _run_with_packages_hidden(hidden: list[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing ``hidden`` fails as if not installed."""
    blocker = textwrap.dedent(f"""
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {hidden!r}:
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Hide())
    """)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_missing_converter_names_the_tflite_extra(tmp_path):
    result = _run_with_packages_hidden(["onnx2tf"], f"""
        from edgeyolo.backends.tflite import convert
        from edgeyolo.errors import EdgeYoloError
        from edgeyolo.targets import load_target
        try:
            convert.build({str(tmp_path / 'model.onnx')!r}, load_target("arm-fp32"), {str(tmp_path)!r}, None)
        except EdgeYoloError as exc:
            print("ERROR", exc)
    """)
    expected = "ERROR building TFLite engines needs the 'onnx2tf' package: pip install 'edgeyolo[tflite]'"
    assert expected in result.stdout, result.stderr


def test_missing_litert_names_the_litert_extra(arm_fp32_bundle):
    result = _run_with_packages_hidden(["ai_edge_litert"], f"""
        import edgeyolo
        from edgeyolo.errors import EdgeYoloError
        try:
            edgeyolo.load({str(arm_fp32_bundle)!r})
        except EdgeYoloError as exc:
            print("ERROR", exc)
    """)
    assert "pip install 'edgeyolo[litert]'" in result.stdout, result.stderr


def test_target_options_are_checked(tmp_path):
    base = dict(name="t", backend="tflite", precision="int8", head="sigmoid")
    with pytest.raises(EdgeYoloError, match="io_dtype must be one of int8, float32"):
        convert.build(tmp_path / "model.onnx", Target(**base, backend_options={"io_dtype": "uint16"}), tmp_path)
    with pytest.raises(EdgeYoloError, match="static-shaped"):
        convert.build(tmp_path / "model.onnx", Target(**{**base, "precision": "fp32"}, dynamic_batch=True), tmp_path)


def test_head_split_is_float_exact(yolov5n_pt, tmp_path):
    """The INT8 rewrite (box and score channels under their own scales) computes exactly the same head."""
    import onnx
    import onnxruntime as ort

    from edgeyolo.backends.tflite.head import split_head_scales
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model

    path = export_onnx(load_model(yolov5n_pt).model, tmp_path / "sigmoid.onnx", ExportOptions(head="sigmoid"))
    model = onnx.load(str(path))
    assert split_head_scales(model) == 3
    onnx.checker.check_model(model)
    assert sum(n.op_type == "Conv" and "/split_a" in n.name for n in model.graph.node) == 3 * 3 * 2
    batch = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"images": batch})[0]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"images": batch})[0]
    assert np.array_equal(before, after)


def test_int8_quantisation_uses_the_tensor_parameters():
    detail = {"dtype": np.int8, "quantization": (1 / 255, -128)}
    inputs = np.array([0, 1, 128, 255, 300], dtype=np.float32) / np.float32(255)
    codes = quantize(inputs, detail)
    assert codes.dtype == np.int8 and codes.tolist() == [-128, -127, 0, 127, 127]  # 300/255 saturates
    assert np.allclose(dequantize(codes, detail), np.array([0, 1, 128, 255, 255]) / 255)
    as_float = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert np.array_equal(quantize(inputs, as_float), inputs)
    assert dequantize(inputs, as_float).dtype == np.float32
