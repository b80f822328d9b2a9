"""Quantisation-aware training: the trainable Q/DQ graph, the checkpoint, and builds that use its learned ranges.

One tiny QAT run (64x64, 4 coco128 images, 2 steps) is shared by the whole module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

IMGSZ = 64


@pytest.fixture(scope="module")
def qat_run(yolov5n_pt, coco128, tmp_path_factory) -> Path:
    from edgeyolo.optimize.qat.trainer import QatConfig, QatRun

    out = tmp_path_factory.mktemp("qat") / "run"
    # every stage INT8 (the default keeps stride 32 in float; at 64 px that is half the graph)
    config = QatConfig(weights=str(yolov5n_pt), data=str(coco128 / "images"), calib=str(coco128 / "images"),
                       out=str(out), imgsz=IMGSZ, batch=2, limit=4, calib_size=4, float_from_stride=0,
                       lr=1e-4, scale_lr=1e-2, learn_scales=True, save_every=0)
    QatRun(config).run()
    return out


@pytest.fixture(scope="module")
def qat_checkpoint(qat_run) -> Path:
    return qat_run / "qat.safetensors"


class _RandomCalibration:
    """Two random IMGSZ images in the shape of a CalibrationSet (what calibration and bias shifts read)."""

    method = ""

    def __len__(self):
        return 2

    def batches(self, layout="NCHW", batch_size=1):
        rng = np.random.default_rng(0)
        for _ in range(2):
            yield rng.random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)


def _graphs(weights, tmp_path):
    """(float ONNX, PTQ Q/DQ ONNX) of ``weights`` at IMGSZ, calibrated on two random images."""
    import onnx

    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model
    from edgeyolo.quantize import QuantizeSettings, calibrate_ranges, write_qdq

    src = export_onnx(load_model(weights).model, tmp_path / "f.onnx", ExportOptions(imgsz=(IMGSZ, IMGSZ), head="sigmoid"))

    settings = QuantizeSettings(float_from_stride=0)
    qdq, _ = write_qdq(src, calibrate_ranges(src, _RandomCalibration(), settings), settings)
    return onnx.load(str(src)), qdq


def test_fake_quant_graph_runs_batches_and_trains_weights_and_scales(yolov5n_pt, tmp_path):
    from edgeyolo.optimize.qat.graph import QdqGraph

    float_model, qdq = _graphs(yolov5n_pt, tmp_path)
    graph = QdqGraph(qdq, float_model)
    out = graph(torch.rand(3, 3, IMGSZ, IMGSZ))["output0"]
    rows = sum(3 * (IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert out.shape == (3, rows, 85)
    out.mean().backward()
    scales = graph.scale_parameters()
    assert len(scales) == len(graph.quantizers) - 1  # all but the input's fixed 1/255 range
    assert sum(float(p.grad.abs()) > 0 for p in scales) > len(scales) // 2
    assert all(p.grad is not None for p in graph.weights.values())


def test_fake_quant_graph_computes_what_onnxruntime_runs(yolov5n_pt, tmp_path):
    """The torch graph is the deployed Q/DQ graph: far closer to ORT's Q/DQ output than FP32 is."""
    from edgeyolo.optimize.qat.graph import QdqGraph

    float_model, qdq = _graphs(yolov5n_pt, tmp_path)
    x = np.random.default_rng(1).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ semantics, unfused
    ref_q = ort.InferenceSession(qdq.SerializeToString(), options).run(None, {"images": x})[0]
    ref_f = ort.InferenceSession(float_model.SerializeToString()).run(None, {"images": x})[0]
    with torch.no_grad():
        mine = QdqGraph(qdq, float_model)(torch.from_numpy(x))["output0"].numpy()
        mine_float = QdqGraph(float_model, float_model)(torch.from_numpy(x))["output0"].numpy()
    assert np.abs(mine_float - ref_f).max() < 1e-4
    quant_error = np.abs(ref_q - ref_f).mean()
    assert quant_error > 1e-3  # quantisation is visible at all
    assert np.abs(mine - ref_q).mean() < quant_error / 10


def test_fake_quant_graph_starts_from_the_bias_corrected_graph(yolov5n_pt, tmp_path):
    """With the PTQ bias shifts applied, the torch graph computes ORT's bias-corrected Q/DQ graph."""
    import copy

    from edgeyolo.optimize.qat.graph import QdqGraph
    from edgeyolo.quantize import apply_bias_shifts, bias_shifts

    float_model, qdq = _graphs(yolov5n_pt, tmp_path)

    shifts = bias_shifts(qdq, tmp_path / "f.onnx", _RandomCalibration())
    corrected = copy.deepcopy(qdq)
    assert apply_bias_shifts(corrected, shifts) > 10 and any(np.any(v) for v in shifts.values())
    graph = QdqGraph(qdq, float_model)
    assert graph.shift_biases(qdq, shifts) == len(shifts)
    x = np.random.default_rng(1).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda m: ort.InferenceSession(m.SerializeToString(), options).run(None, {"images": x})[0]  # noqa: E731
    ref_corrected, ref_plain = run(corrected), run(qdq)
    with torch.no_grad():
        mine = graph(torch.from_numpy(x))["output0"].numpy()
    assert np.abs(mine - ref_corrected).mean() < np.abs(ref_plain - ref_corrected).mean() / 5


def test_qat_checkpoint_records_learned_scales_and_writes_qdq(qat_run, qat_checkpoint):
    import onnx
    from onnx import numpy_helper

    from edgeyolo.model import load_model

    loaded = load_model(qat_checkpoint)  # an ordinary checkpoint for every other command
    qat = loaded.description["meta"]["qat"]
    assert qat["format"] == "edgeyolo-qat" and qat["training"]["steps"] == 2
    assert qat["settings"]["float_from_stride"] == 0
    assert qat["refit"]["convs"] > 10  # the target's recipe: training starts from the re-fit PTQ graph
    assert qat["target"] == "jetson-int8" and qat["settings"]["placement"] == "onnxruntime"
    assert Path(qat["teacher"]["weights"]).is_file()
    qdq = onnx.load(str(qat_run / "model.qdq.onnx"))
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    written = {i.name: float(numpy_helper.to_array(i)) for i in qdq.graph.initializer if i.name in qat["scales"]}
    assert written == pytest.approx(qat["scales"], rel=1e-6) and len(written) == len(qat["scales"])
    learned = [qat["scales"][k] for k in qat["scales"] if k != "images_scale"]
    assert any(abs(qat["ranges"][k[:-len("_scale")]][1] / 127.5 / v - 1) > 1e-4
               for k, v in qat["scales"].items() if k != "images_scale" and k[:-len("_scale")] in qat["ranges"]), \
        "training moved no scale"
    assert all(v > 0 for v in learned)
    x = np.random.default_rng(2).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    out = ort.InferenceSession(str(qat_run / "model.qdq.onnx")).run(None, {"images": x})[0]
    assert out.shape[-1] == 85 and np.isfinite(out).all()


def _tiny_val(coco128: Path, root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image in sorted((coco128 / "images").rglob("*.jpg"))[:4]:
        shutil.copy(image, root / "images")
        label = next((coco128 / "labels").rglob(f"{image.stem}.txt"))
        shutil.copy(label, root / "labels")
    return root


def test_build_from_qat_checkpoint_skips_calibration_and_passes_the_gate(qat_checkpoint, coco128, tmp_path,
                                                                         monkeypatch):
    from click.testing import CliRunner

    from edgeyolo import quantize
    from edgeyolo.cli import cli

    def no_calibration(*args, **kwargs):
        raise AssertionError("a QAT build must not calibrate")

    monkeypatch.setattr(quantize, "calibrate_ranges", no_calibration)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["build", str(qat_checkpoint), "--target", "cpu-int8", "--imgsz", str(IMGSZ),
                                      "-o", str(out), "--val", str(_tiny_val(coco128, tmp_path / "val")),
                                      "--max-drop", "100"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["quantization"] == "qat"
    assert manifest["backend"]["quantization"]["method"] == "qat"
    accuracy = manifest["accuracy"]
    assert accuracy["passed"] and accuracy["images"] == 4
    assert 0 <= accuracy["this"]["map50_95"] <= 1


def test_intel_cpu_int8_runs_the_learned_qdq_graph(qat_run, qat_checkpoint, tmp_path):
    pytest.importorskip("openvino")
    from edgeyolo.build import BuildOptions, build_bundle
    from edgeyolo.optimize.qat.learned import learned_ranges_for
    from edgeyolo.runtime import load

    learned = learned_ranges_for(qat_checkpoint)
    bundle = build_bundle(qat_checkpoint, "intel-cpu-int8", tmp_path / "ov", BuildOptions(imgsz=IMGSZ),
                          calibration=learned)
    assert bundle.manifest["backend"]["quantization"]["method"] == "qat"
    bgr = np.random.default_rng(3).integers(0, 256, (1, IMGSZ, IMGSZ, 3), dtype=np.uint8)
    assert bundle.manifest["input"]["dtype"] == "uint8"  # OpenVINO's bundles take the BGR letterbox itself
    x = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255
    ov_out = load(bundle).engine.infer(bgr)
    ort_out = ort.InferenceSession(str(qat_run / "model.qdq.onnx")).run(None, {"images": x})[0]
    assert np.abs(ov_out - ort_out).mean() < 5e-3


def test_arm_int8_cannot_take_learned_ranges(qat_checkpoint, capsys):
    from edgeyolo.cli.deploy import _learned_ranges
    from edgeyolo.targets import load_target

    assert _learned_ranges(qat_checkpoint, load_target("cpu-int8")) is not None
    assert _learned_ranges(qat_checkpoint, load_target("arm-int8")) is None
    assert "cannot take a QAT checkpoint's learned ranges" in capsys.readouterr().err.replace("\n", " ")


def _tampered(checkpoint: Path, tmp_path: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    description = json.loads(metadata["edgeyolo"])
    edit(description["meta"]["qat"])
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "edgeyolo": json.dumps(description)})
    return path


def _drop_a_scale(qat):
    qat["scales"].pop(sorted(k for k in qat["scales"] if k != "images_scale")[0])


@pytest.mark.parametrize("edit", [
    lambda qat: qat["scales"].update({"images_scale": -1.0}),
    lambda qat: qat.update(version=99),
    lambda qat: qat["settings"].update(keep_float="model.0"),
    lambda qat: qat["settings"].update(placement="everywhere"),
    lambda qat: qat["settings"].update(placement="tensorrt"),  # not the graph these scales were trained on
    _drop_a_scale,
], ids=["negative-scale", "version", "keep-float-type", "placement-unknown", "placement-other", "scale-missing"])
def test_bad_qat_checkpoint_is_one_line_and_exit_2(qat_checkpoint, tmp_path, edit):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    bad = _tampered(qat_checkpoint, tmp_path, edit)
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["build", str(bad), "--target", "cpu-int8", "--imgsz", str(IMGSZ), "-o", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "QAT" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_fixed_scales_keep_the_calibrated_ones(yolov5n_pt, coco128, tmp_path):
    """``--fixed-scales`` trains the weights only: the checkpoint's scales are the calibrated ranges' own."""
    from edgeyolo.model import load_model
    from edgeyolo.optimize.qat.trainer import QatConfig, QatRun

    config = QatConfig(weights=str(yolov5n_pt), data=str(coco128 / "images"), calib=str(coco128 / "images"),
                       out=str(tmp_path / "run"), imgsz=IMGSZ, batch=2, limit=2, calib_size=2, float_from_stride=0,
                       learn_scales=False, save_every=0)
    qat = load_model(QatRun(config).run()).description["meta"]["qat"]
    assert qat["training"]["learn_scales"] is False
    calibrated = {k: max(map(abs, qat["ranges"][k[:-len("_scale")]])) / 127.5 for k in qat["scales"]
                  if k != "images_scale" and k[:-len("_scale")] in qat["ranges"]}  # symmetric: the larger side
    assert len(calibrated) > 20
    assert all(qat["scales"][k] == pytest.approx(v, rel=1e-6) for k, v in calibrated.items())


def test_asymmetric_qat_keeps_its_zero_points_and_tensorrt_refuses_it(yolov5n_pt, coco128, tmp_path):
    """QAT of cpu-int8 (asymmetric activations): zero points fixed and recorded, scales learned; builds
    write them back; a TensorRT target (symmetric only) and an edited zero point are refused in one line."""
    import onnx
    from click.testing import CliRunner
    from onnx import numpy_helper

    from edgeyolo.cli import cli
    from edgeyolo.model import load_model
    from edgeyolo.optimize.qat.trainer import QatConfig, QatRun

    run = tmp_path / "run"
    QatRun(QatConfig(weights=str(yolov5n_pt), data=str(coco128 / "images"), calib=str(coco128 / "images"),
                     out=str(run), target="cpu-int8", imgsz=IMGSZ, batch=2, limit=4, calib_size=4,
                     float_from_stride=0, lr=1e-4, scale_lr=1e-2, save_every=0)).run()
    qat = load_model(run / "qat.safetensors").description["meta"]["qat"]
    assert qat["settings"]["activations"] == "asymmetric"
    assert qat["zero_points"].keys() == qat["scales"].keys()
    assert sum(z != 128 for z in qat["zero_points"].values()) > 20
    qdq = onnx.load(str(run / "model.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    for node in (n for n in qdq.graph.node if n.op_type == "QuantizeLinear"):
        assert int(inits[node.input[2]]) == qat["zero_points"][node.input[1]]
        assert float(inits[node.input[1]]) == pytest.approx(qat["scales"][node.input[1]], rel=1e-7)
    for target in ("jetson-int8", "cpu-int8"):
        weights = run / "qat.safetensors" if target == "jetson-int8" else _tampered(
            run / "qat.safetensors", tmp_path, lambda q: q["zero_points"].update(
                {k: (v + 1) % 256 for k, v in list(q["zero_points"].items())[:1]}))
        out = tmp_path / f"never-{target}"
        result = CliRunner().invoke(cli, ["build", str(weights), "--target", target, "--imgsz", str(IMGSZ),
                                          "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert ("asymmetric" if target == "jetson-int8" else "zero points") in result.output
        assert "Traceback" not in result.output and not out.exists()


def test_qat_refuses_a_tflite_target(yolov5n_pt, coco128, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    result = CliRunner().invoke(cli, ["qat", str(yolov5n_pt), "--data", str(coco128), "--calib", str(coco128),
                                      "-o", str(tmp_path / "run"), "--target", "arm-int8"])
    assert result.exit_code == 2 and "cannot take learned ranges" in result.output
    assert not (tmp_path / "run").exists()


def test_jetson_int8_bundle_holds_the_learned_qdq_graph(qat_checkpoint, tmp_path):
    """The NVIDIA targets compile the Q/DQ ONNX with the learned scales, explicitly (never re-calibrated)."""
    import onnx
    from click.testing import CliRunner
    from onnx import numpy_helper

    from edgeyolo.cli import cli
    from edgeyolo.model import load_model

    out = tmp_path / "jetson"
    result = CliRunner().invoke(cli, ["build", str(qat_checkpoint), "--target", "jetson-int8", "--imgsz", str(IMGSZ),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["options"]["int8_calibration"] == "explicit"
    assert "onnx_fp" not in manifest["backend"]["files"]  # no FP graph for TensorRT's own calibrator
    scales = load_model(qat_checkpoint).description["meta"]["qat"]["scales"]
    graph = onnx.load(str(out / manifest["backend"]["files"]["onnx"]))
    written = {i.name: float(numpy_helper.to_array(i)) for i in graph.graph.initializer if i.name in scales}
    assert written == pytest.approx(scales, rel=1e-6) and len(written) == len(scales)


def test_qat_on_cuda_says_so_without_a_gpu(yolov5n_pt, coco128, tmp_path):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (test_qat_trains_on_cuda covers it)")
    result = CliRunner().invoke(cli, ["qat", str(yolov5n_pt), "--data", str(coco128), "--calib", str(coco128),
                                      "-o", str(tmp_path / "run"), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qat_trains_on_cuda_and_saves_a_cpu_checkpoint(yolov5n_pt, coco128, tmp_path):
    from edgeyolo.model import load_model
    from edgeyolo.optimize.qat.trainer import QatConfig, QatRun

    config = QatConfig(weights=str(yolov5n_pt), data=str(coco128 / "images"), calib=str(coco128 / "images"),
                       out=str(tmp_path / "run"), imgsz=IMGSZ, batch=2, limit=4, calib_size=4, float_from_stride=0,
                       save_every=0, device="cuda")
    path = QatRun(config).run()
    qat = load_model(path).description["meta"]["qat"]
    assert qat["training"]["device"].startswith("cuda") and qat["training"]["steps"] == 2
