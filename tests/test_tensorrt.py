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
from edgeyolo.bundle import load_bundle
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
    with pytest.raises(EdgeYoloError):
        algorithm_for("mse")


# --------------------------------------------------------------------------- the portable bundle
@pytest.fixture(scope="session")
def jetson_int8_bundle(yolov5n_pt, int8_calibration, tmp_path_factory):
    from edgeyolo.build import build_bundle

    if gpu_count():
        pytest.skip("a GPU is present: builds compile engines instead of portable bundles")
    out = tmp_path_factory.mktemp("trt") / "jetson-int8"
    return build_bundle(yolov5n_pt, "jetson-int8", out, calibration=int8_calibration)


def test_portable_int8_bundle_holds_the_qdq_graph_and_the_fp_graph(jetson_int8_bundle, int8_calibration):
    bundle = load_bundle(jetson_int8_bundle.path)
    backend = bundle.manifest["backend"]
    assert backend["name"] == "tensorrt" and backend["portable"] is True and backend["version"] is None
    assert backend["files"] == {"onnx": "model.onnx", "onnx_fp": "model-fp.onnx"}
    assert sorted(bundle.manifest["checksums"]) == ["model-fp.onnx", "model.onnx"]
    assert bundle.manifest["output"]["head"] == "sigmoid"
    assert backend["options"]["int8_calibration"] == "auto"
    qdq = onnx.load(str(bundle.file("onnx")))
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp = onnx.load(str(bundle.file("onnx_fp")))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in fp.graph.node}
    calib = bundle.manifest["calibration"]
    assert calib["images"] == len(int8_calibration) and calib["method"] and backend["quantization"]["method"] in calib["method"]


def test_portable_fp16_bundle(yolov5n_pt, tmp_path):
    from edgeyolo.build import build_bundle

    if gpu_count():
        pytest.skip("a GPU is present")
    bundle = build_bundle(yolov5n_pt, "cuda-fp16", tmp_path / "cuda-fp16")
    assert bundle.manifest["backend"]["files"] == {"onnx": "model.onnx"}
    assert bundle.manifest["backend"]["portable"] is True and bundle.manifest["output"]["head"] == "decoded"


def test_same_qdq_graph_as_cpu_int8(jetson_int8_bundle, cpu_int8_bundle):
    """jetson-int8's Q/DQ ONNX is cpu-int8's graph, so its CPU accuracy is cpu-int8's."""
    ours = onnx.load(str(jetson_int8_bundle.file("onnx")))
    cpu = onnx.load(str(load_bundle(cpu_int8_bundle).file("onnx")))
    assert [(n.op_type, list(n.input)) for n in ours.graph.node] == [(n.op_type, list(n.input)) for n in cpu.graph.node]
    ours_w = {i.name: onnx.numpy_helper.to_array(i) for i in ours.graph.initializer}
    cpu_w = {i.name: onnx.numpy_helper.to_array(i) for i in cpu.graph.initializer}
    assert ours_w.keys() == cpu_w.keys()
    assert all(np.array_equal(ours_w[k], cpu_w[k]) for k in ours_w)


def test_eval_on_onnxruntime_gives_cpu_int8_numbers(jetson_int8_bundle, cpu_int8_bundle, coco_val_dataset):
    from edgeyolo.evaluate import evaluate
    from edgeyolo.gate import load_for_eval
    from edgeyolo.runtime import load

    dataset = coco_val_dataset
    fallback = load_for_eval(load_bundle(jetson_int8_bundle.path))  # no TensorRT here: its ONNX on onnxruntime
    assert fallback.engine.info["backend"] == "onnxruntime"
    ours = evaluate(fallback, dataset, limit=10)  # the same graph: equal on any images, ten are plenty
    cpu = evaluate(load(cpu_int8_bundle), dataset, limit=10)
    assert ours.map50_95 == pytest.approx(cpu.map50_95, abs=1e-9) and ours.map50 == pytest.approx(cpu.map50, abs=1e-9)


def test_compile_plan_picks_the_graph_per_tensorrt_version(jetson_int8_bundle, tmp_path, logged):
    """What the device would compile, decided without TensorRT: explicit Q/DQ from 10.1, implicit before."""
    from dataclasses import replace

    from edgeyolo.backends.tensorrt import CompileJob, plan_compile

    bundle = load_bundle(jetson_int8_bundle.path)
    job = CompileJob.from_bundle(bundle)
    cache = EngineCache([tmp_path / "engines"])
    new = plan_compile(job, "10.3.0", cache)
    assert (new.mode, new.source.name, new.input_shape, new.calibration_key) == (
        "int8-explicit", "model.onnx", (1, 3, 640, 640), None)
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


def test_implicit_calibration_reloads_the_bundles_images(jetson_int8_bundle, int8_calibration):
    """On the device, the calibration set is rebuilt from the manifest: same images, same letterbox."""
    from edgeyolo.backends.tensorrt import (
        CompileJob,
        head_tensors,
        load_calibration_for,
    )

    job = CompileJob.from_bundle(load_bundle(jetson_int8_bundle.path))
    calibration = load_calibration_for(job, (1, 3, 640, 640))
    assert calibration.describe()["images_sha256"] == job.calibration_facts["images_sha256"]
    assert len(CalibrationBatches(calibration, (1, 3, 640, 640))) == len(int8_calibration)
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
    (bundle.path / "manifest.json").write_text(json.dumps(manifest))
    return bundle.path
