"""In-engine preprocessing: engines that take the BGR uint8 letterbox find what host preprocessing finds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from detection_match import unmatched

import edgeyolo
from edgeyolo.errors import EdgeYoloError
from edgeyolo.runtime.detector import is_image_input

MIN_IOU = 0.99


def _host_preprocessing_twin(weights, target_name, tmp_path_factory, calibration=None):
    """The same target built with ``uint8_input = false``: a float engine fed by host preprocessing."""
    from edgeyolo.build import build_bundle
    from edgeyolo.targets import load_target

    target = load_target(target_name)
    target = dataclasses.replace(target, backend_options={**target.backend_options, "uint8_input": False})
    out = tmp_path_factory.mktemp("bundles") / f"{target_name}-float-input"
    return build_bundle(weights, target, out, calibration=calibration).path


def _detect_all(bundle, paths):
    detector = edgeyolo.load(bundle)
    return detector, [detector.detect(str(p), conf=0.1) for p in paths]


def _assert_same_detections(image_bundle, float_bundle, paths):
    image_detector, image_dets = _detect_all(image_bundle, paths)
    float_detector, float_dets = _detect_all(float_bundle, paths)
    assert image_detector.takes_image and not float_detector.takes_image
    assert sum(map(len, float_dets)) >= 20
    for a, b in zip(image_dets, float_dets):
        assert not unmatched(a, b, score_tol=0.01, min_iou=MIN_IOU)
        assert not unmatched(b, a, score_tol=0.01, min_iou=MIN_IOU)


@pytest.fixture(scope="module")
def images(sample_images, coco128):
    return list(sample_images) + sorted((coco128 / "images").glob("*.jpg"))[:6]


def test_onnxruntime_engine_takes_the_uint8_letterbox(cpu_fp32_bundle, yolov5n_pt, tmp_path_factory, images):
    spec = json.loads((cpu_fp32_bundle / "manifest.json").read_text())["input"]
    assert (spec["layout"], spec["dtype"], spec["channel_order"], spec["shape"]) == ("NHWC", "uint8", "BGR",
                                                                                     [1, 640, 640, 3])
    _assert_same_detections(cpu_fp32_bundle, _host_preprocessing_twin(yolov5n_pt, "cpu-fp32", tmp_path_factory),
                            images)


def test_openvino_engine_takes_the_uint8_letterbox(ov_fp32_bundle, yolov5n_pt, tmp_path_factory, images):
    _assert_same_detections(ov_fp32_bundle, _host_preprocessing_twin(yolov5n_pt, "intel-cpu-fp32", tmp_path_factory),
                            images)


def test_int8_engine_takes_the_uint8_letterbox(yolov5n_pt, quick_int8_calibration, tmp_path_factory, images,
                                               monkeypatch):
    """intel-cpu-int8: one NNCF pass, its model saved behind both inputs (the input is prepended after
    quantising, so the two engines differ only in who letterboxes); cpu-int8 is checked below."""
    from edgeyolo.backends import openvino as openvino_backend
    from edgeyolo.build import build_bundle
    from edgeyolo.targets import load_target

    pytest.importorskip("nncf")
    quantize, done = openvino_backend.quantize, {}

    def quantize_once(model, *args):
        if "result" not in done:
            done["result"] = quantize(model, *args)
        quantized, *facts = done["result"]
        return (quantized.clone(), *facts)

    monkeypatch.setattr(openvino_backend, "quantize", quantize_once)
    float_bundle = _host_preprocessing_twin(yolov5n_pt, "intel-cpu-int8", tmp_path_factory, quick_int8_calibration)
    image_bundle = build_bundle(yolov5n_pt, load_target("intel-cpu-int8"),
                                tmp_path_factory.mktemp("bundles") / "intel-cpu-int8-image-input",
                                calibration=quick_int8_calibration).path
    _assert_same_detections(image_bundle, float_bundle, images)


def test_unknown_engine_inputs_are_refused_in_one_line():
    assert not is_image_input({"layout": "NCHW"}) and not is_image_input({"dtype": "float32", "layout": "NHWC"})
    assert is_image_input({"dtype": "uint8", "layout": "NHWC", "channel_order": "BGR"})
    for spec in ({"dtype": "float16"}, {"dtype": "uint8", "layout": "NCHW", "channel_order": "BGR"},
                 {"dtype": "uint8", "layout": "NHWC", "channel_order": "RGB"}):
        with pytest.raises(EdgeYoloError, match="cannot feed"):
            is_image_input(spec)


def test_the_float_graph_is_unchanged_behind_the_new_input(tmp_path, exported_onnx):
    """The prepended nodes compute exactly float32(x) / 255 in RGB NCHW: same outputs, bit for bit."""
    import shutil

    import onnxruntime as ort

    from edgeyolo.backends.image_input import prepend_to_onnx
    from edgeyolo.runtime.preprocess import to_input

    source = exported_onnx["decoded"]
    path = tmp_path / "m.onnx"
    shutil.copyfile(source, path)
    assert prepend_to_onnx(path)[1:] == [3, 640, 640]
    boxed = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    run = lambda p, x: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(path, boxed[None]), run(source, to_input(boxed)))
    # the sensitivity / benchmark runner feeds a network input to either kind of ONNX
    from edgeyolo.sensitivity import OnnxRunner

    runner = OnnxRunner([to_input(boxed)])
    np.testing.assert_array_equal(runner(path)[0], runner(source)[0])


def test_cpu_int8_takes_the_letterbox_in_front_of_the_nvidia_graph(cpu_int8_bundle, images, tmp_path):
    """cpu-int8 takes the letterbox like the other CPU targets; behind the four prepended nodes is the
    float-input Q/DQ graph (the NVIDIA targets' placement), whose outputs fed by host preprocessing are
    the same, bit for bit."""
    import onnx
    import onnxruntime as ort

    from edgeyolo.bundle import load_bundle
    from edgeyolo.runtime import read_image
    from edgeyolo.runtime.preprocess import LetterboxSettings, letterbox, to_input

    spec = load_bundle(cpu_int8_bundle).manifest["input"]
    assert (spec["layout"], spec["dtype"], spec["shape"]) == ("NHWC", "uint8", [1, 640, 640, 3])
    model = onnx.load(str(cpu_int8_bundle / "model.onnx"))
    prepended = [n for n in model.graph.node if n.name.startswith("edgeyolo_input_")]
    assert [n.op_type for n in prepended] == ["Transpose", "Gather", "Cast", "Div"]
    behind = model.graph.node[len(prepended)]
    assert (behind.op_type, behind.input[0]) == ("QuantizeLinear", "images_float_nchw")  # the graph's own input Q
    for node in prepended:
        model.graph.node.remove(node)
    model.graph.input.remove(model.graph.input[0])
    model.graph.input.insert(0, onnx.helper.make_tensor_value_info("images_float_nchw", onnx.TensorProto.FLOAT,
                                                                   [1, 3, 640, 640]))
    onnx.save(model, str(tmp_path / "float-input.onnx"))

    def session(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    takes_image, takes_float = session(cpu_int8_bundle / "model.onnx"), session(tmp_path / "float-input.onnx")
    for path in images[:3]:
        boxed = letterbox(read_image(path), LetterboxSettings(imgsz=(640, 640), auto=False, stride=32))[0]
        np.testing.assert_array_equal(takes_image.run(None, {"images": boxed[None]})[0],
                                      takes_float.run(None, {"images_float_nchw": to_input(boxed)})[0])
