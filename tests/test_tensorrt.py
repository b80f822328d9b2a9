"""The TensorRT backend: everything that needs no GPU for real, the engine build and run where one is present.

Without TensorRT (our CI) the portable bundle, the Q/DQ re-encoding for TensorRT, the engine
cache's keying and mismatch logic, the options and the calibrator's batches and cache files
are tested here; the engine tests at the end skip cleanly unless TensorRT and a GPU are present.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgeyolo.backends.trt.cache import (
    EngineCache,
    EngineKey,
    FileCache,
    calibration_cache,
    calibration_cache_key,
    resolve,
    timing_cache,
)
from edgeyolo.backends.trt.calibrator import CalibrationBatches, algorithm_for
from edgeyolo.backends.trt.device import gpu_count
from edgeyolo.backends.trt.options import (
    TrtOptions,
    int8_mode,
    parse_version,
    workspace_bytes,
)
from edgeyolo.bundle import Bundle, load_bundle
from edgeyolo.errors import EdgeYoloError

MIB = 1 << 20


@pytest.fixture
def logged(caplog, monkeypatch):
    """edgeyolo's warnings, also after a CLI test has stopped the package logger from propagating."""
    from edgeyolo.log import log

    monkeypatch.setattr(log, "propagate", True)
    return caplog


def key(**overrides) -> EngineKey:
    base = dict(tensorrt="10.3.0", gpu="Orin", compute_capability="8.7", dla_core=-1, mode="int8-explicit",
                source_sha256="ab" * 32, settings="s1")
    return EngineKey(**{**base, **overrides})


# --------------------------------------------------------------------------- options
def test_options_defaults_and_validation():
    assert TrtOptions.from_options({}) == TrtOptions()
    assert TrtOptions.from_options({"dla_core": 0, "timing_cache": False}).dla_core == 0
    for bad in ({"int8_calibration": "magic"}, {"workspace_fraction": 0}, {"dla_core": -2},
                {"timing_cache": "yes"}, {"workspace": 1}):
        with pytest.raises(EdgeYoloError):
            TrtOptions.from_options(bad)


def test_workspace_comes_from_free_memory_capped_and_floored():
    options = TrtOptions(workspace_fraction=0.5, max_workspace_mib=4096)
    assert workspace_bytes(2048 * MIB, options) == 1024 * MIB
    assert workspace_bytes(80 * 1024 * MIB, options) == 4096 * MIB  # capped
    assert workspace_bytes(10 * MIB, options) == 64 * MIB  # floored
    assert workspace_bytes(1000 * MIB + 12345, options) % MIB == 0


def test_int8_mode_follows_tensorrt_version():
    auto = TrtOptions()
    assert parse_version("10.3.0.26") == (10, 3, 0, 26) and parse_version("8.5.2") == (8, 5, 2)
    assert int8_mode(auto, "10.3.0", has_fp_onnx=True) == "explicit"
    assert int8_mode(auto, "10.0.1", has_fp_onnx=True) == "implicit"  # the calibrators' last full release
    assert int8_mode(auto, "8.5.2", has_fp_onnx=True) == "implicit"
    assert int8_mode(auto, "8.5.2", has_fp_onnx=False) == "explicit"
    assert int8_mode(TrtOptions(int8_calibration="explicit"), "8.5.2", True) == "explicit"
    with pytest.raises(EdgeYoloError, match="no implicit INT8"):
        int8_mode(TrtOptions(int8_calibration="implicit"), "11.0.0", True)
    with pytest.raises(EdgeYoloError, match="lacks"):
        int8_mode(TrtOptions(int8_calibration="implicit"), "8.6.1", False)


# --------------------------------------------------------------------------- engine cache
def test_engine_key_slug_is_readable_and_unique():
    a, b = key(), key(settings="s2")
    assert a.slug().startswith("trt10.3.0-orin-sm87-int8-explicit-")
    assert a.slug() != b.slug() and a.slug() == key().slug()
    assert "-dla1-" in key(dla_core=1).slug()
    assert key(gpu="NVIDIA GeForce RTX 4090").slug().startswith("trt10.3.0-nvidia-geforce-rtx-4090-sm87")
    assert a.same_device(b) and not a.same_device(key(tensorrt="8.6.2"))


def test_engine_cache_stores_finds_and_verifies(tmp_path):
    cache = EngineCache([tmp_path / "engines"])
    k = key()
    assert cache.find(k) is None
    path = cache.store(k, b"engine-bytes", meta={"source": "model.onnx"})
    assert path.parent == tmp_path / "engines" and path.read_bytes() == b"engine-bytes"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["key"]["gpu"] == "Orin" and record["source"] == "model.onnx"
    assert cache.find(k).path == path
    assert cache.find(key(settings="other")) is None
    path.write_bytes(b"tampered")  # a corrupted engine is not used
    assert cache.find(k) is None


def test_engine_built_for_another_device_is_reported_and_rebuilt_when_allowed(tmp_path, logged):
    cache = EngineCache([tmp_path / "engines"])
    cache.store(key(tensorrt="8.6.2", gpu="Xavier", compute_capability="7.2"), b"old")
    here = key(tensorrt="10.3.0", gpu="Orin", compute_capability="8.7")
    assert [e.key.gpu for e in cache.built_elsewhere(here)] == ["Xavier"]
    assert resolve(cache, here, allow_build=True) is None  # None: build it
    assert "TensorRT 8.6.2 on Xavier (sm 7.2)" in logged.text and "TensorRT 10.3.0 on Orin" in logged.text
    with pytest.raises(EdgeYoloError, match="compiled for TensorRT 8.6.2 on Xavier.*edgeyolo build my-bundle"):
        resolve(cache, here, allow_build=False, bundle_name="my-bundle")
    # an engine of another model is not "this model compiled for another device"
    assert cache.built_elsewhere(key(source_sha256="cd" * 32)) == []
    with pytest.raises(EdgeYoloError, match="no engine compiled for"):
        resolve(EngineCache([tmp_path / "empty"]), here, allow_build=False)


def test_engine_cache_falls_back_to_a_writable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    readonly = tmp_path / "bundle" / "engines"
    readonly.mkdir(parents=True)
    readonly.chmod(0o500)
    try:
        cache = EngineCache([readonly, tmp_path / "user"])
        path = cache.store(key(), b"x")
        assert path.parent == tmp_path / "user" and cache.find(key()).path == path
    finally:
        readonly.chmod(0o700)


def test_engine_cache_skips_an_unwritable_folder_as_root_too(tmp_path):
    blocker = tmp_path / "bundle"
    blocker.write_text("a file where the bundle folder should be")  # mkdir fails for everyone
    cache = EngineCache([blocker / "engines", tmp_path / "user"])
    assert cache.store(key(), b"x").parent == tmp_path / "user"
    assert cache.writable_folder() == tmp_path / "user"


def test_calibration_cache_key_follows_the_calibration_manifest(tmp_path):
    facts = {"images_sha256": "1" * 64, "images": 128, "seed": 0, "source": "/a/coco128",
             "preprocess": {"imgsz": [640, 640]}, "method": "entropy"}
    base = calibration_cache_key(facts, (1, 3, 640, 640), "ab" * 32, "entropy", "8.6.2.3")
    assert base == calibration_cache_key({**facts, "source": "/elsewhere"}, (1, 3, 640, 640), "ab" * 32,
                                         "entropy", "8.6.1")  # same images elsewhere, same TensorRT minor
    for changed in (calibration_cache_key({**facts, "images_sha256": "2" * 64}, (1, 3, 640, 640), "ab" * 32,
                                          "entropy", "8.6.2"),
                    calibration_cache_key(facts, (1, 3, 320, 320), "ab" * 32, "entropy", "8.6.2"),
                    calibration_cache_key(facts, (1, 3, 640, 640), "ab" * 32, "minmax", "8.6.2"),
                    calibration_cache_key(facts, (1, 3, 640, 640), "ab" * 32, "entropy", "8.5.2")):
        assert changed != base
    table = calibration_cache(tmp_path, base)
    assert table.path.name == f"calibration-{base}.cache" and table.read() is None
    table.write(b"TRT-8602-EntropyCalibration2\nimages: 3c010a14\n")
    assert FileCache(table.path).read().startswith(b"TRT-8602")


def test_timing_cache_is_per_tensorrt_and_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEYOLO_CACHE", str(tmp_path))
    a = timing_cache("10.3.0", "Orin", "8.7")
    assert a.path.parent == tmp_path / "tensorrt" and a.path.name == "timing-trt10.3.0-orin-sm87.cache"
    assert timing_cache("10.3.0", "NVIDIA H100", "9.0").path != a.path


# --------------------------------------------------------------------------- calibrator batches
def test_calibration_batches_are_full_contiguous_float32(coco128_calibration):
    batches = CalibrationBatches(coco128_calibration, (4, 3, 640, 640))
    assert len(batches) == len(coco128_calibration) // 4 and batches.dropped == len(coco128_calibration) % 4
    seen = list(batches)
    assert len(seen) == len(batches)
    first = seen[0]
    assert first.shape == (4, 3, 640, 640) and first.dtype == np.float32 and first.flags["C_CONTIGUOUS"]
    assert 0.0 <= first.min() and first.max() <= 1.0 and batches.nbytes == first.nbytes
    expected = next(coco128_calibration.batches("NCHW", 4))
    np.testing.assert_array_equal(first, expected)  # the runtime's own preprocessing, unchanged

    odd = CalibrationBatches(coco128_calibration, (3, 3, 640, 640))
    assert len(list(odd)) == len(coco128_calibration) // 3  # a short last batch is left out
    with pytest.raises(EdgeYoloError, match="letterboxed to 640x640"):
        CalibrationBatches(coco128_calibration, (1, 3, 320, 320))


def test_calibration_algorithms():
    assert algorithm_for("entropy") == "entropy" and algorithm_for("minmax") == "minmax"
    assert algorithm_for("percentile 99.99") == "entropy"  # TensorRT has no percentile calibrator
    assert algorithm_for("mean-minmax, bias correction") == "minmax"  # the Q/DQ recipe's description
    with pytest.raises(EdgeYoloError):
        algorithm_for("mse")


# --------------------------------------------------------------------------- the portable bundle
@pytest.fixture(scope="session")
def jetson_int8_bundle(yolov5n_pt, quick_int8_calibration, tmp_path_factory):
    from edgeyolo.build import build_bundle

    if gpu_count():
        pytest.skip("a GPU is present: builds compile engines instead of portable bundles")
    out = tmp_path_factory.mktemp("trt") / "jetson-int8"
    return build_bundle(yolov5n_pt, "jetson-int8", out, calibration=quick_int8_calibration)


def test_portable_int8_bundle_holds_the_qdq_graph_and_the_fp_graph(jetson_int8_bundle, quick_int8_calibration):
    bundle = load_bundle(jetson_int8_bundle.path)
    backend = bundle.manifest["backend"]
    assert backend["name"] == "tensorrt" and backend["portable"] is True and backend["version"] is None
    assert backend["files"] == {"onnx": "model.onnx", "onnx_fp": "model-fp.onnx", "onnx_typed": "model-typed.onnx"}
    assert sorted(bundle.manifest["checksums"]) == ["model-fp.onnx", "model-typed.onnx", "model.onnx"]
    assert bundle.manifest["output"]["head"] == "sigmoid"
    assert backend["options"]["int8_calibration"] == "auto"
    qdq = onnx.load(str(bundle.file("onnx")))
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp = onnx.load(str(bundle.file("onnx_fp")))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in fp.graph.node}
    calib = bundle.manifest["calibration"]
    assert calib["images"] == len(quick_int8_calibration) and calib["method"] and backend["quantization"]["method"] in calib["method"]


def test_portable_fp16_bundle(yolov5n_pt, images, tmp_path):
    from edgeyolo.build import build_bundle

    if gpu_count():
        pytest.skip("a GPU is present")
    bundle = build_bundle(yolov5n_pt, "cuda-fp16", tmp_path / "cuda-fp16")
    assert bundle.manifest["backend"]["files"] == {"onnx": "model.onnx", "onnx_typed": "model-typed.onnx"}
    assert bundle.manifest["backend"]["portable"] is True and bundle.manifest["output"]["head"] == "decoded"
    # the FP16-typed graph (strongly typed networks, TensorRT >= 10.12) computes what the FP32 graph does
    fp32, fp16 = (_ort_outputs(bundle.file(k), _letterboxed(images[0])) for k in ("onnx", "onnx_typed"))
    assert fp16.dtype == np.float32 and fp16.shape == fp32.shape
    confident = fp32[..., 4] > 0.25
    assert confident.sum() > 10
    boxes, scores = np.abs(fp16 - fp32)[confident][:, :4], np.abs(fp16 - fp32)[confident][:, 4:]
    assert boxes.max() < 2.0 and scores.max() < 0.03  # pixels at 640, probabilities: FP16 rounding only


def test_same_qdq_graph_as_symmetric_cpu_int8(jetson_int8_bundle, symmetric_int8_bundle, cpu_int8_bundle):
    """jetson-int8's Q/DQ ONNX is cpu-int8's graph with symmetric activations (TensorRT takes no zero
    points), so its CPU accuracy is that graph's; cpu-int8 itself has the same placement, asymmetric."""
    def nodes(model):
        return [(n.op_type, list(n.input)) for n in model.graph.node]

    def arrays(model):
        return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    ours = onnx.load(str(jetson_int8_bundle.file("onnx")))
    cpu = onnx.load(str(load_bundle(symmetric_int8_bundle).file("onnx")))
    assert nodes(ours) == nodes(cpu)
    ours_w, cpu_w = arrays(ours), arrays(cpu)
    assert ours_w.keys() == cpu_w.keys()
    assert all(np.array_equal(ours_w[k], cpu_w[k]) for k in ours_w)
    asymmetric = onnx.load(str(load_bundle(cpu_int8_bundle).file("onnx")))
    # behind the letterbox input it takes (four nodes prepended, after quantising)
    behind = [(op, [name.replace("images_float_nchw", "images") for name in inputs])
              for (op, inputs), node in zip(nodes(asymmetric), asymmetric.graph.node)
              if not node.name.startswith("edgeyolo_input_")]
    assert len(behind) == len(asymmetric.graph.node) - 4 and behind == nodes(ours)
    zero_points = {n.input[2] for n in ours.graph.node if n.op_type == "QuantizeLinear"}
    assert all(int(ours_w[z]) == 128 for z in zero_points)
    assert sum(int(arrays(asymmetric)[z]) != 128 for z in zero_points) > 50


def test_eval_on_onnxruntime_gives_the_symmetric_graphs_numbers(jetson_int8_bundle, symmetric_int8_bundle,
                                                               coco_val_dataset):
    from edgeyolo.evaluate import evaluate
    from edgeyolo.gate import load_for_eval
    from edgeyolo.runtime import load

    dataset = coco_val_dataset
    fallback = load_for_eval(load_bundle(jetson_int8_bundle.path))  # no TensorRT here: its ONNX on onnxruntime
    assert fallback.engine.info["backend"] == "onnxruntime"
    ours = evaluate(fallback, dataset, limit=10)  # the same graph: equal on any images, ten are plenty
    cpu = evaluate(load(symmetric_int8_bundle), dataset, limit=10)
    assert ours.map50_95 == pytest.approx(cpu.map50_95, abs=1e-9) and ours.map50 == pytest.approx(cpu.map50, abs=1e-9)


def test_compile_plan_picks_the_graph_per_tensorrt_version(jetson_int8_bundle, tmp_path, logged):
    """What the device would compile, decided without TensorRT: explicit Q/DQ from 10.1, implicit before."""
    from dataclasses import replace

    from edgeyolo.backends.tensorrt import CompileJob, plan_compile

    bundle = load_bundle(jetson_int8_bundle.path)
    job = CompileJob.from_bundle(bundle)
    cache = EngineCache([tmp_path / "engines"])
    new = plan_compile(job, "10.3.0", cache)
    assert (new.mode, new.typing, new.source.name, new.input_shape, new.calibration_key) == (
        "int8-explicit", "weak", "model.onnx", (1, 3, 640, 640), None)
    for version in ("10.12.0", "10.16.1", "11.1.0"):  # strongly typed: the FP16-typed Q/DQ graph
        typed = plan_compile(job, version, cache)
        assert (typed.mode, typed.typing, typed.source.name) == ("int8-explicit", "strong", "model-typed.onnx")
        assert typed.settings_digest() != new.settings_digest()
    with pytest.raises(EdgeYoloError, match="strongly typed networks only.*rebuild the bundle"):
        plan_compile(replace(job, typed_onnx=None), "11.1.0", cache)  # a bundle from before the typed graph
    assert plan_compile(replace(job, typed_onnx=None), "10.12.0", cache).typing == "weak"  # flags still exist
    old = plan_compile(job, "8.6.2", cache)  # the calibration images are where the manifest says
    assert (old.mode, old.source.name, old.algorithm) == ("int8-implicit", "model-fp.onnx", "minmax")
    assert old.calibration_key and old.settings_digest() != new.settings_digest()

    moved = replace(job, calibration_facts={**job.calibration_facts, "source": str(tmp_path / "gone")})
    assert plan_compile(moved, "8.6.2", cache).mode == "int8-explicit"  # nothing to calibrate on: explicit
    assert "compiling the explicit Q/DQ ONNX instead" in logged.text
    calibration_cache(tmp_path / "engines", old.calibration_key).write(b"TRT-8602-MinMaxCalibration\n")
    assert plan_compile(moved, "8.6.2", cache).mode == "int8-implicit"  # ... unless a calibration cache is there
    forced = replace(moved, options=TrtOptions(int8_calibration="implicit"))
    assert plan_compile(forced, "8.6.2", EngineCache([tmp_path / "none"])).mode == "int8-implicit"


def test_implicit_calibration_reloads_the_bundles_images(jetson_int8_bundle, quick_int8_calibration):
    """On the device, the calibration set is rebuilt from the manifest: same images, same letterbox."""
    from edgeyolo.backends.tensorrt import (
        CompileJob,
        head_tensors,
        load_calibration_for,
    )

    job = CompileJob.from_bundle(load_bundle(jetson_int8_bundle.path))
    calibration = load_calibration_for(job, (1, 3, 640, 640))
    assert calibration.describe()["images_sha256"] == job.calibration_facts["images_sha256"]
    assert len(CalibrationBatches(calibration, (1, 3, 640, 640))) == len(quick_int8_calibration)
    tensors = head_tensors(onnx.load(str(job.fp_onnx)))
    assert "output0" in tensors and len(tensors) >= 3 + 12  # 3 conv outputs + reshape/transpose/sigmoid/concat
    with pytest.raises(EdgeYoloError, match="calibration images on this device"):
        from dataclasses import replace

        load_calibration_for(replace(job, calibration_facts={**job.calibration_facts, "source": "/nowhere"}),
                             (1, 3, 640, 640))


def test_cli_eval_with_backend_onnxruntime(jetson_int8_bundle, coco_val):
    from edgeyolo.cli import cli

    result = CliRunner().invoke(cli, ["eval", str(jetson_int8_bundle.path), "--backend", "onnxruntime",
                                      "--data", str(coco_val), "--limit", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["images"] == 5


def test_compiling_without_tensorrt_is_one_clear_line(jetson_int8_bundle):
    from edgeyolo.cli import cli

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = CliRunner().invoke(cli, ["build", str(jetson_int8_bundle.path)])
    assert result.exit_code == 2
    assert "TensorRT is not installed here" in result.output and "--backend onnxruntime" in result.output
    assert "Traceback" not in result.output


def test_tensorrt_targets_are_listed():
    from edgeyolo.targets import load_target

    for name, precision, head in (("cuda-fp16", "fp16", "decoded"), ("cuda-int8", "int8", "sigmoid"),
                                  ("jetson-fp16", "fp16", "decoded"), ("jetson-int8", "int8", "sigmoid")):
        target = load_target(name)
        assert (target.backend, target.precision, target.head) == ("tensorrt", precision, head)
        TrtOptions.from_options(target.backend_options)  # every option known and valid


def test_runtime_import_needs_neither_torch_nor_tensorrt():
    import subprocess
    import sys

    code = ("import sys, edgeyolo.backends.tensorrt, edgeyolo.backends.trt.runner, edgeyolo.backends.trt.builder;"
            "assert 'torch' not in sys.modules and 'tensorrt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the FP16-typed graphs, on ONNX Runtime
def _letterboxed(image) -> np.ndarray:
    from edgeyolo.runtime.preprocess import LetterboxSettings, preprocess

    batch, _ = preprocess(image, LetterboxSettings(imgsz=(640, 640)))
    return batch


def _ort_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's CPU kernels fuse Q/DQ pairs into QLinear* ops that take FP32 scales only; run the graph as written
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_outputs(path, batch) -> np.ndarray:
    session = _ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


class _OrtGraph:
    """One ONNX file of a bundle as a Detector's engine."""

    def __init__(self, path):
        self.session, self.info = _ort_session(path), {"backend": "onnxruntime"}

    def infer(self, batch):
        return self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]


def test_typed_int8_graph_is_fp16_around_int8_and_detects_what_the_qdq_graph_does(jetson_int8_bundle, images):
    """INT8+FP16 expressed in the ONNX: FP16 scales, weights and activations, FP32 input/output, same detections."""
    from onnx import TensorProto

    from edgeyolo.runtime import Detector

    bundle = load_bundle(jetson_int8_bundle.path)
    typed = onnx.load(str(bundle.file("onnx_typed")))
    assert {(o.domain, o.version) for o in typed.opset_import} >= {("", 19)}  # FP16 Q/DQ scales need opset 19
    io = [t.type.tensor_type.elem_type for t in (*typed.graph.input, *typed.graph.output)]
    assert io == [TensorProto.FLOAT, TensorProto.FLOAT]
    inits = {i.name: i for i in typed.graph.initializer}
    scales = [inits[n.input[1]].data_type for n in typed.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and set(scales) == {TensorProto.FLOAT16}
    zero_points = [inits[n.input[2]].data_type for n in typed.graph.node if n.op_type == "QuantizeLinear"]
    assert set(zero_points) == {TensorProto.INT8}  # TensorRT's encoding
    convs = [n for n in typed.graph.node if n.op_type == "Conv"]
    assert all(inits[n.input[2]].data_type == TensorProto.FLOAT16 for n in convs if len(n.input) > 2
               and n.input[2] in inits)

    reference = Detector(bundle, _OrtGraph(bundle.file("onnx")))
    candidate = Detector(bundle, _OrtGraph(bundle.file("onnx_typed")))
    matched = 0
    for image in images:
        ref, got = reference.detect(image), candidate.detect(image)
        for box, score, cls in zip(ref.xyxy, ref.confidence, ref.class_id):
            if score < 0.4:  # the sample images hold 6 such detections (FP32 has exactly 5 at >= 0.5, one at 0.53)
                continue
            same = got.class_id == cls
            assert same.any(), (cls, score)
            ious = _iou(box, got.xyxy[same])
            best = int(np.argmax(ious))
            # FP16 before each Q may move a value across a rounding step: small, bounded differences
            assert ious[best] >= 0.85 and abs(got.confidence[same][best] - score) <= 0.1, (cls, score, ious[best])
            matched += 1
    assert matched >= 5


# --------------------------------------------------------------------------- no GPU, however cuda-python says it
class _Err(int):
    """A cuda-python error enum: an int with a name."""


def _install_cuda_stub(monkeypatch, get_device_count):
    """``cuda.bindings.runtime`` as cuda-python >= 12.6 lays it out, answering with ``get_device_count``."""
    import sys
    import types

    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaGetDeviceCount = get_device_count
    runtime.cudaGetErrorString = lambda err: (_Err(0), b"cudaErrorInsufficientDriver" if int(err) == 35 else b"?")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)


def _raise(exc):
    def call(*_):
        raise exc
    return call


@pytest.mark.parametrize("answer, reason", [
    (_raise(RuntimeError("Function \"cuGetProcAddress\" not found")), "RuntimeError"),  # 12.0-12.8, no libcuda
    (lambda: (_Err(35), 0), "cudaErrorInsufficientDriver"),  # cuda-python newer than the driver (12.9 on JetPack 6)
    (lambda: (_Err(100), 0), "?"),  # cudaErrorNoDevice
    (_raise(OSError("libcuda.so.1: cannot open shared object file")), "OSError"),
    (_raise(ImportError("cannot import name 'runtime'")), "ImportError"),
    (lambda: (_Err(0), 0), "no device"),
])
def test_any_failure_to_reach_cuda_means_no_gpu(monkeypatch, answer, reason):
    from edgeyolo.backends.trt import device

    _install_cuda_stub(monkeypatch, answer)
    assert device.gpu_count() == 0
    with pytest.raises(EdgeYoloError, match=f"none usable here.*{reason}"):
        device.require_gpu()


def test_gpu_count_without_cuda_python_and_with_a_gpu(monkeypatch):
    import sys

    from edgeyolo.backends.trt import device

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    assert device.gpu_count() == 0
    _install_cuda_stub(monkeypatch, lambda: (_Err(0), 2))
    assert device.gpu_count() == 2
    device.require_gpu()


def test_build_writes_the_portable_bundle_when_cuda_python_raises(monkeypatch, yolov5n_pt, tmp_path):
    """A workstation with TensorRT's wheel and cuda-python but no driver: a portable bundle, not a crash."""
    import sys
    import types

    from edgeyolo.build import build_bundle

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    _install_cuda_stub(monkeypatch, _raise(RuntimeError("CUDA driver not found")))
    bundle = build_bundle(yolov5n_pt, "cuda-fp16", tmp_path / "cuda-fp16")
    assert bundle.manifest["backend"]["portable"] is True and "engine" not in bundle.manifest["backend"]["files"]


class _HostCuda:
    """A cuda-python runtime whose "GPU" is host memory: the selfcheck's copies, stream and buffers, run for real."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, count=1, corrupt=False):
        self.count, self.corrupt, self.buffers, self.streams = count, corrupt, {}, set()

    def cudaGetDeviceCount(self):  # noqa: N802
        return (_Err(35), 0) if self.count is None else (_Err(0), self.count)

    def cudaGetErrorString(self, err):  # noqa: N802
        return _Err(0), b"cudaErrorInsufficientDriver"

    def cudaDriverGetVersion(self):  # noqa: N802
        return _Err(0), 12020

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        from types import SimpleNamespace

        return _Err(0), SimpleNamespace(name=b"Orin", major=8, minor=7, totalGlobalMem=8 << 30, integrated=1)

    def cudaMalloc(self, nbytes):  # noqa: N802
        import ctypes

        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return _Err(0), ctypes.addressof(buffer)

    cudaMallocHost = cudaMalloc  # noqa: N815

    def cudaFree(self, ptr):  # noqa: N802
        self.buffers.pop(int(ptr))
        return (_Err(0),)

    cudaFreeHost = cudaFree  # noqa: N815

    def cudaStreamCreate(self):  # noqa: N802
        self.streams.add(7)
        return _Err(0), 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert stream in self.streams
        return (_Err(0),)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.discard(stream)
        return (_Err(0),)

    def cudaMemcpy(self, dst, src, nbytes, kind):  # noqa: N802
        import ctypes

        ctypes.memmove(dst, src, nbytes)
        return (_Err(0),)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        import ctypes

        assert stream in self.streams
        ctypes.memmove(dst, src, nbytes)
        if self.corrupt and kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memset(dst, 0xFF, 4)
        return (_Err(0),)


def test_selfcheck_makes_a_real_round_trip(monkeypatch, capsys):
    from edgeyolo.backends.trt import device, selfcheck

    cuda = _HostCuda()
    monkeypatch.setattr(device, "cuda_runtime", lambda: cuda)
    assert selfcheck.main([]) == 0
    line = capsys.readouterr().out
    assert "ok: 1 CUDA device(s), Orin (sm 8.7), driver CUDA 12.2" in line and "1 MiB pinned -> GPU -> pinned" in line
    assert cuda.buffers == {} and cuda.streams == set()  # everything freed
    corrupt = _HostCuda(corrupt=True)
    monkeypatch.setattr(device, "cuda_runtime", lambda: corrupt)
    assert selfcheck.main([]) == 1
    assert "came back different" in capsys.readouterr().err
    old_driver = _HostCuda(count=None)  # cuda-python newer than the driver
    monkeypatch.setattr(device, "cuda_runtime", lambda: old_driver)
    assert selfcheck.main([]) == 1
    err = capsys.readouterr().err
    assert "cudaErrorInsufficientDriver" in err and "newer CUDA than the driver's 12.2" in err


# --------------------------------------------------------------------------- TensorRT versions, with stubs
def _trt_stub(version: str, weak_flags: bool = True, strongly_typed: bool = True):
    from types import SimpleNamespace

    creation = {"EXPLICIT_BATCH": 0} if parse_version(version) < (11,) else {}
    if strongly_typed:
        creation["STRONGLY_TYPED"] = 1 if creation else 0
    builder_flags = {"FP16": 0, "INT8": 1} if weak_flags else {"GPU_FALLBACK": 4}
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**creation),
                           BuilderFlag=SimpleNamespace(**builder_flags))


def test_version_matrix_accepts_8_5_to_11(logged):
    from edgeyolo.backends.trt.builder import check_version

    for version in ("8.5.2.2", "8.6.2", "10.3.0.30", "10.16.0", "11.1.0.4"):
        check_version(_trt_stub(version, weak_flags=parse_version(version) < (11,)))
    assert "newer than" not in logged.text
    with pytest.raises(EdgeYoloError, match="too old.*8.5"):
        check_version(_trt_stub("8.4.1"))
    check_version(_trt_stub("12.0.0", weak_flags=False))  # tried, with a warning
    assert "newer than the releases edgeyolo knows" in logged.text


def test_network_flags_per_tensorrt_version():
    from edgeyolo.backends.trt.builder import network_flags

    assert network_flags(_trt_stub("8.5.2", strongly_typed=False), "weak") == 1 << 0  # explicit batch
    assert network_flags(_trt_stub("8.6.1"), "weak") == 1 << 0
    assert network_flags(_trt_stub("10.3.0"), "weak") == 0
    assert network_flags(_trt_stub("10.12.0"), "strong") == 1 << 1
    assert network_flags(_trt_stub("11.1.0", weak_flags=False), "strong") == 1 << 0  # accepted and ignored
    with pytest.raises(EdgeYoloError, match="strongly typed networks only"):
        network_flags(_trt_stub("11.1.0", weak_flags=False), "weak")
    with pytest.raises(EdgeYoloError, match="cannot build strongly typed"):
        network_flags(_trt_stub("8.5.2", strongly_typed=False), "strong")


def test_network_typing_matrix():
    from edgeyolo.backends.trt.options import network_typing

    for version, mode, typed, expected in (
            ("8.5.2", "int8-implicit", True, "weak"), ("8.6.2", "int8-explicit", True, "weak"),
            ("10.3.0", "int8-explicit", True, "weak"), ("10.11.0", "fp16", True, "weak"),
            ("10.12.0", "int8-explicit", True, "strong"), ("10.12.0", "fp16", True, "strong"),
            ("10.12.0", "int8-explicit", False, "weak"), ("10.16.0", "int8-implicit", True, "weak"),
            ("10.16.0", "fp32", True, "weak"), ("11.1.0", "fp32", False, "strong"),
            ("11.1.0", "fp16", True, "strong"), ("11.0.0", "int8-explicit", True, "strong")):
        assert network_typing(version, mode, typed) == expected, (version, mode, typed)
    with pytest.raises(EdgeYoloError, match="rebuild the bundle"):
        network_typing("11.1.0", "fp16", False)


# --------------------------------------------------------------------------- DLA
def test_dla_rejects_fp32_and_dynamic_batch_up_front(tmp_path):
    from edgeyolo.backends.tensorrt import build
    from edgeyolo.backends.trt.options import check_dla
    from edgeyolo.targets import Target

    dla = TrtOptions(dla_core=1)
    check_dla(dla, "int8", dynamic_batch=False)
    check_dla(dla, "fp16", dynamic_batch=False)
    check_dla(TrtOptions(), "fp32", dynamic_batch=True)  # the GPU takes both
    with pytest.raises(EdgeYoloError, match="DLA runs fp16 and int8 only, not fp32"):
        check_dla(dla, "fp32", dynamic_batch=False)
    with pytest.raises(EdgeYoloError, match="fixed batch \\(min = opt = max\\)"):
        check_dla(dla, "int8", dynamic_batch=True)
    # build() says so before writing anything
    target = Target(name="orin-dla", backend="tensorrt", precision="fp16", dynamic_batch=True,
                    backend_options={"dla_core": 0})
    with pytest.raises(EdgeYoloError, match="fixed batch"):
        build(tmp_path / "missing.onnx", target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runner_sets_the_dla_core_before_deserialising():
    from types import SimpleNamespace

    from edgeyolo.backends.trt.runner import TrtRunner, set_dla_core

    events = []

    class Runtime:
        num_DLA_cores = 2

        def __init__(self, logger):
            pass

        def __setattr__(self, name, value):
            events.append((name, value))

        def deserialize_cuda_engine(self, data):
            events.append(("deserialize", data))
            return None

    trt = SimpleNamespace(__version__="10.3.0", Runtime=Runtime, Logger=lambda level: object(),
                          BuilderFlag=SimpleNamespace(FP16=0))
    trt.Logger.WARNING = 2
    with pytest.raises(EdgeYoloError, match="could not load the engine"):
        TrtRunner(trt, b"plan", dla_core=1)
    assert events == [("DLA_core", 1), ("deserialize", b"plan")]
    with pytest.raises(EdgeYoloError, match="built for DLA core 2, but this device has 2"):
        set_dla_core(Runtime(None), 2)
    events.clear()
    set_dla_core(Runtime(None), -1)  # the GPU: nothing to set
    assert events == []


def test_runner_rejects_a_batch_outside_the_profile():
    from types import SimpleNamespace

    from edgeyolo.backends.trt.runner import TrtRunner

    engine = SimpleNamespace(get_tensor_shape=lambda name: (-1, 3, 640, 640),
                             get_tensor_profile_shape=lambda name, profile: [(1, 3, 640, 640), (4, 3, 640, 640),
                                                                           (8, 3, 640, 640)])
    runner = object.__new__(TrtRunner)
    runner.engine, runner.input_names, runner.bindings = engine, ["images"], {}
    runner.context = SimpleNamespace(set_input_shape=lambda name, shape: shape[0] <= 8)
    with pytest.raises(EdgeYoloError, match="batches of 1 to 8 .*not \\(16, 3, 640, 640\\)"):
        runner._prepare((16, 3, 640, 640))


# --------------------------------------------------------------------------- the calibrator's callbacks
class _Table:
    def __init__(self, data=None):
        self.data, self.path, self.writes = data, Path("calibration-x.cache"), []

    def read(self):
        return self.data

    def write(self, data):
        self.writes.append(data)


def _batches(count, fail_at=None):
    for index in range(count):
        if index == fail_at:
            raise OSError("image 7.jpg: device or resource busy")
        yield np.full((2, 3, 8, 8), index, np.float32)


def test_calibration_error_in_get_batch_is_reraised_after_the_build():
    from edgeyolo.backends.trt.calibrator import CalibrationFeed

    feed = CalibrationFeed((2, 3, 8, 8), lambda: _batches(5, fail_at=3), _Table())
    assert feed.read_cache() is None
    got = [feed.next_batch() for _ in range(6)]
    assert [b is not None for b in got] == [True, True, True, False, False, False]  # TensorRT sees the end
    assert feed.seen == 3
    with pytest.raises(EdgeYoloError, match="calibration failed after 3 batch.*OSError: image 7.jpg"):
        feed.raise_if_failed()

    complete = CalibrationFeed((2, 3, 8, 8), lambda: _batches(2), _Table())
    while complete.next_batch() is not None:
        pass
    complete.raise_if_failed()  # all batches: nothing to report
    wrong = CalibrationFeed((1, 3, 8, 8), lambda: _batches(2), _Table())
    assert wrong.next_batch() is None
    with pytest.raises(EdgeYoloError, match="shape \\(2, 3, 8, 8\\), not \\(1, 3, 8, 8\\)"):
        wrong.raise_if_failed()
    empty = CalibrationFeed((2, 3, 8, 8), lambda: iter(()), _Table())
    assert empty.next_batch() is None
    with pytest.raises(EdgeYoloError, match="no batches"):
        empty.raise_if_failed()


def test_accepted_calibration_cache_loads_no_images_and_a_rejected_one_recalibrates(logged):
    from edgeyolo.backends.trt.calibrator import CalibrationFeed

    def never():
        raise AssertionError("the images were loaded although TensorRT took the cache")

    accepted = CalibrationFeed((2, 3, 8, 8), never, _Table(b"TRT-8502-EntropyCalibration2\n"))
    assert accepted.read_cache().startswith(b"TRT-8502")
    accepted.raise_if_failed()  # TensorRT asked for no batch: fine

    loads = []
    table = _Table(b"TRT-8401-EntropyCalibration2\n")  # written by another TensorRT: rejected
    rejected = CalibrationFeed((2, 3, 8, 8), lambda: loads.append(1) or _batches(3), table)
    rejected.read_cache()
    assert sum(rejected.next_batch() is not None for _ in range(4)) == 3 and loads == [1]
    rejected.write_cache(b"TRT-8502-EntropyCalibration2\nnew")
    rejected.raise_if_failed()
    assert table.writes == [b"TRT-8502-EntropyCalibration2\nnew"]
    assert "rejected the calibration cache" in logged.text


def test_calibrator_records_a_failed_upload(monkeypatch):
    """The TensorRT subclass (a stub base here) hands TensorRT None and keeps the upload's error."""
    from types import SimpleNamespace

    from edgeyolo.backends.trt import calibrator as module
    from edgeyolo.backends.trt import device

    class Buffer:
        def __init__(self, nbytes):
            self.nbytes, self.uploads = nbytes, 0

        def upload(self, host):
            self.uploads += 1
            if self.uploads == 2:
                raise EdgeYoloError("CUDA cudaMemcpy failed: cudaErrorLaunchFailure")

        def __int__(self):
            return 0xDEAD

        def close(self):
            pass

    class Base:
        def __init__(self):
            pass

    monkeypatch.setattr(device, "DeviceBuffer", Buffer)
    trt = SimpleNamespace(IInt8EntropyCalibrator2=Base, IInt8MinMaxCalibrator=Base)
    feed = module.CalibrationFeed((2, 3, 8, 8), lambda: _batches(4), _Table())
    calibrator = module.make_calibrator(trt, "entropy", feed)
    assert calibrator.get_batch_size() == 2 and calibrator.read_calibration_cache() is None
    assert calibrator.get_batch(["images"]) == [0xDEAD]
    assert calibrator.get_batch(["images"]) is None  # the failed upload: TensorRT sees the end of data
    with pytest.raises(EdgeYoloError, match="after 2 batch.*cudaErrorLaunchFailure"):
        feed.raise_if_failed()


def test_implicit_calibrator_recalibrates_when_tensorrt_rejects_the_cache(jetson_int8_bundle, tmp_path, monkeypatch,
                                                                           logged):
    """The wiring on the device (stub TensorRT base class, host "GPU"): a cached table is offered first;
    asked for batches anyway, the calibrator loads the bundle's own calibration images."""
    from types import SimpleNamespace

    from edgeyolo.backends.tensorrt import CompileJob, implicit_calibrator, plan_compile
    from edgeyolo.backends.trt import device

    class Base:
        def __init__(self):
            pass

    monkeypatch.setattr(device, "cuda_runtime", lambda: _HostCuda())
    job = CompileJob.from_bundle(load_bundle(jetson_int8_bundle.path))
    cache = EngineCache([tmp_path / "engines"])
    plan = plan_compile(job, "8.6.2", cache)
    calibration_cache(tmp_path / "engines", plan.calibration_key).write(b"TRT-8401-MinMaxCalibration\n")
    trt = SimpleNamespace(IInt8EntropyCalibrator2=Base, IInt8MinMaxCalibrator=Base)
    calibrator = implicit_calibrator(trt, job, plan, cache)
    assert calibrator.read_calibration_cache() == b"TRT-8401-MinMaxCalibration\n"
    pointers = calibrator.get_batch(["images"])
    assert pointers is not None, calibrator.feed.error  # rejected: calibrating on the bundle's images
    assert "rejected the calibration cache" in logged.text and calibrator.feed.seen == 1
    calibrator.close()
    calibrator.feed.raise_if_failed()


# --------------------------------------------------------------------------- on a GPU with TensorRT
requires_tensorrt_gpu = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or gpu_count() == 0, reason="needs TensorRT and a CUDA GPU")


def _needs_tensorrt_gpu():
    trt = pytest.importorskip("tensorrt")
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU here")
    return trt


@pytest.fixture(scope="module")
def gpu_bundles(yolov5n_pt, coco128_calibration, tmp_path_factory):
    _needs_tensorrt_gpu()
    from edgeyolo.build import build_bundle

    root = tmp_path_factory.mktemp("trt-gpu")
    return {name: build_bundle(yolov5n_pt, name, root / name, calibration=coco128_calibration
                               if name.endswith("int8") else None) for name in ("cuda-fp16", "cuda-int8")}


@requires_tensorrt_gpu
def test_gpu_build_compiles_into_the_bundle(gpu_bundles):
    for bundle in gpu_bundles.values():
        backend = bundle.manifest["backend"]
        assert backend["portable"] is False and backend["files"]["engine"].startswith("engines/")
        assert (bundle.path / backend["files"]["engine"]).is_file()


@requires_tensorrt_gpu
def test_gpu_fp16_matches_cpu_fp32(gpu_bundles, cpu_fp32_bundle, sample_images):
    """Every cpu-fp32 detection scoring >= 0.4 is found by cuda-fp16: same class, IoU >= 0.9, score within 0.03."""
    from edgeyolo.runtime import load

    reference, candidate = load(cpu_fp32_bundle), load(gpu_bundles["cuda-fp16"].path)
    assert candidate.info["backend"] == "tensorrt"
    for image in sample_images:
        ref, got = reference.detect(image), candidate.detect(image)
        for box, score, cls in zip(ref.xyxy, ref.confidence, ref.class_id):
            if score < 0.4:
                continue
            same = got.class_id == cls
            assert same.any(), (cls, score)
            ious = _iou(box, got.xyxy[same])
            best = int(np.argmax(ious))
            assert ious[best] >= 0.9 and abs(got.confidence[same][best] - score) <= 0.03, (cls, score, ious[best])


def _iou(a, b):
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


@requires_tensorrt_gpu
def test_gpu_int8_runs_and_reports_memory(gpu_bundles, sample_images):
    from edgeyolo.runtime import load

    detector = load(gpu_bundles["cuda-int8"].path)
    dets = detector.detect(sample_images[0])
    assert len(dets) > 0
    stats = detector.engine.memory_stats()
    assert stats["gpu_memory_total_mb"] > 0 and stats["engine_activation_mb"] >= 0


@requires_tensorrt_gpu
def test_gpu_portable_bundle_compiles_once_and_is_cached(yolov5n_pt, tmp_path):
    _needs_tensorrt_gpu()
    from edgeyolo.build import compile_portable

    bundle = _portable_copy(yolov5n_pt, tmp_path)
    first = compile_portable(bundle)
    mtime = first.stat().st_mtime_ns
    assert first.parent == bundle / "engines"
    assert compile_portable(bundle) == first and first.stat().st_mtime_ns == mtime  # cached: not rebuilt


@requires_tensorrt_gpu
def test_gpu_engine_for_another_device_is_rebuilt(yolov5n_pt, tmp_path, logged):
    _needs_tensorrt_gpu()
    from edgeyolo.build import compile_portable

    bundle = _portable_copy(yolov5n_pt, tmp_path)
    engine = compile_portable(bundle)
    sidecar = engine.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["key"].update(tensorrt="7.0.0", gpu="Some Other GPU")
    stale = engine.with_name("stale.engine")
    engine.rename(stale)
    sidecar.unlink()
    stale.with_suffix(".json").write_text(json.dumps(record))
    rebuilt = compile_portable(bundle)
    assert rebuilt.is_file() and "TensorRT 7.0.0 on Some Other GPU" in logged.text


def _portable_copy(yolov5n_pt, tmp_path) -> Path:
    """A cuda-fp16 bundle without an engine, as a workstation without TensorRT writes it."""
    import shutil

    from edgeyolo.build import build_bundle

    bundle = build_bundle(yolov5n_pt, "cuda-fp16", tmp_path / "built")
    shutil.rmtree(bundle.path / "engines")
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    manifest["backend"]["files"].pop("engine")
    manifest["checksums"] = {k: v for k, v in manifest["checksums"].items() if not k.startswith("engines/")}
    Bundle(path=bundle.path, manifest=manifest).update_manifest()  # re-sealed: the manifest carries its digest
    return bundle.path
