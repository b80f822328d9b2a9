"""Shared fixtures: the real files in ../shared/fixtures (skipped cleanly where absent) and built bundles.

With ``EDGEYOLO_REQUIRE_FIXTURES=1`` (CI sets it) a missing fixture fails the test instead, so a broken
path can never turn the suite into a green no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EDGEYOLO_FIXTURES", ROOT.parent / "shared" / "fixtures"))
REQUIRE_FIXTURES = os.environ.get("EDGEYOLO_REQUIRE_FIXTURES", "") not in ("", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one OpenMP/torch thread each (set before torch is imported) instead
    # of two workers each spreading over every core, which costs more in contention than it gains.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        if REQUIRE_FIXTURES:
            pytest.fail(f"fixture {path} missing (EDGEYOLO_REQUIRE_FIXTURES is set)", pytrace=False)
        pytest.skip(f"fixture {path} not present")
    return path


@pytest.fixture(scope="session")
def yolov5n_pt() -> Path:
    return fixture_path("weights", "yolov5n.pt")


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return [fixture_path("images", "bus.jpg"), fixture_path("images", "zidane.jpg")]


@pytest.fixture(scope="session")
def images(sample_images) -> list:
    """The sample images as BGR arrays."""
    from edgeyolo.runtime import read_image

    return [read_image(p) for p in sample_images]


@pytest.fixture(scope="session")
def coco_val() -> Path:
    return fixture_path("coco-val-500")


@pytest.fixture(scope="session")
def coco128() -> Path:
    return fixture_path("coco128")


@pytest.fixture(scope="session")
def expected_dir() -> Path:
    return fixture_path("expected")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/edgeyolo from tests."""
    cache = tmp_path_factory.mktemp("edgeyolo-cache")
    old = os.environ.get("EDGEYOLO_CACHE")
    os.environ["EDGEYOLO_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("EDGEYOLO_CACHE", None)
    else:
        os.environ["EDGEYOLO_CACHE"] = old


@pytest.fixture(autouse=True)
def _restore_edgeyolo_logger():
    """In-process CLI runs (CliRunner) route the package logger to stderr; undo that after each test."""
    import logging

    logger = logging.getLogger("edgeyolo")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="session")
def cpu_fp32_bundle(yolov5n_pt, tmp_path_factory) -> Path:
    """The reference bundle, built once per test session."""
    from edgeyolo.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "cpu-fp32"
    build_bundle(yolov5n_pt, "cpu-fp32", out)
    return out


# Every INT8 bundle of a session calibrates on one set: all 128 coco128 images when the session runs slow tests
# (the full-set accuracy checks need them, and the plumbing tests then share those bundles), a seeded draw of 32
# otherwise: the edit loop (-m "not slow") checks structure, manifests and parity, not accuracy.
QUICK_CALIBRATION_IMAGES = 32


def _calibration(weights, coco128, size):
    from edgeyolo.build import prepare_calibration
    from edgeyolo.targets import Target

    target = Target(name="test-int8", backend="onnxruntime", precision="int8")
    return prepare_calibration(weights, target, coco128 / "images", size=size)


SMALL_IMGSZ = 160  # the quantiser's unit tests: yolov5n exported small, a few coco128 images


@pytest.fixture(scope="session")
def small_onnx(yolov5n_pt, tmp_path_factory):
    """yolov5n at SMALL_IMGSZ with the sigmoid head (the INT8 targets' export), once per session."""
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model

    out = tmp_path_factory.mktemp("small") / "small.onnx"
    return export_onnx(load_model(yolov5n_pt).model, out,
                       ExportOptions(imgsz=(SMALL_IMGSZ, SMALL_IMGSZ), head="sigmoid"))


def small_calibration(weights, coco128, size, seed=0):
    """``size`` coco128 images (a seeded draw) letterboxed for a SMALL_IMGSZ cpu-int8 engine."""
    import dataclasses

    from edgeyolo.build import prepare_calibration
    from edgeyolo.targets import load_target

    target = dataclasses.replace(load_target("cpu-int8"), imgsz=(SMALL_IMGSZ, SMALL_IMGSZ))
    return prepare_calibration(weights, target, coco128 / "images", size=size, seed=seed)


# The session's expensive bundles, in two families. Under pytest-xdist (``-n 2 --dist loadgroup``,
# pyproject.toml) every test that needs one of a family runs in the same worker, so each bundle is
# still built once; the families go to different workers and the other tests fill in around them.
EXPENSIVE_FIXTURES = {
    "onnxruntime-int8": {"cpu_int8_bundle", "symmetric_int8_bundle", "jetson_int8_bundle"},
    "openvino-tflite-val": {"ov_int8_bundle", "arm_int8_bundle", "arm_fp32_bundle", "arm_fp16_bundle",
                            "intel_fp16_bundle", "cpu_fp32_coco_val_result"},
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = set(item.fixturenames)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "bundle_fixture" in callspec.params:  # tests that getfixturevalue() it
            needs.add(callspec.params["bundle_fixture"])
        for group, fixtures in EXPENSIVE_FIXTURES.items():
            if needs & fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
                break


def _runs_slow_tests(session) -> bool:
    return any(item.get_closest_marker("slow") for item in session.items)


@pytest.fixture(scope="session")
def coco128_calibration(yolov5n_pt, coco128):
    """coco128 letterboxed for 640x640 engines (every image; the default size asks for 300)."""
    return _calibration(yolov5n_pt, coco128, 128)


@pytest.fixture(scope="session")
def int8_calibration(request, yolov5n_pt, coco128):
    """The calibration every INT8 bundle of this session is built with (see QUICK_CALIBRATION_IMAGES)."""
    if _runs_slow_tests(request.session):
        return request.getfixturevalue("coco128_calibration")
    return _calibration(yolov5n_pt, coco128, QUICK_CALIBRATION_IMAGES)


@pytest.fixture(scope="session")
def quick_int8_calibration(request, yolov5n_pt, coco128):
    """QUICK_CALIBRATION_IMAGES images in every run: for INT8 bundles whose structure, not accuracy, is tested."""
    if not _runs_slow_tests(request.session):
        return request.getfixturevalue("int8_calibration")
    return _calibration(yolov5n_pt, coco128, QUICK_CALIBRATION_IMAGES)


def _build(weights, target, tmp_path_factory, calibration=None) -> Path:
    from edgeyolo.build import build_bundle

    return build_bundle(weights, target, tmp_path_factory.mktemp("bundles") / target, calibration=calibration).path


@pytest.fixture(scope="session")
def cpu_int8_bundle(yolov5n_pt, int8_calibration, tmp_path_factory) -> Path:
    """cpu-int8 (ONNX Runtime's Q/DQ ONNX, asymmetric activations), built once per session."""
    return _build(yolov5n_pt, "cpu-int8", tmp_path_factory, int8_calibration)


@pytest.fixture(scope="session")
def symmetric_int8_bundle(yolov5n_pt, quick_int8_calibration, tmp_path_factory) -> Path:
    """cpu-int8 with symmetric activations and the float input: the Q/DQ ONNX the NVIDIA int8 targets
    compile, on ONNX Runtime (a jetson-int8 build from the same images in the same process reuses its
    weight re-fit)."""
    import dataclasses

    from edgeyolo.build import build_bundle
    from edgeyolo.targets import load_target

    base = load_target("cpu-int8")
    target = dataclasses.replace(base, name="cpu-int8-symmetric",
                                 calibration={**base.calibration, "activations": "symmetric"},
                                 backend_options={**base.backend_options, "uint8_input": False})
    out = tmp_path_factory.mktemp("bundles") / target.name
    return build_bundle(yolov5n_pt, target, out, calibration=quick_int8_calibration).path


def assert_calibrated_on_coco128(bundle) -> None:
    """Accuracy tests measure bundles calibrated as the README's table: on all 128 coco128 images."""
    import json

    assert json.loads((Path(bundle) / "manifest.json").read_text())["calibration"]["images"] == 128


@pytest.fixture(scope="session")
def coco_val_dataset(coco_val):
    """coco-val-500 read once (the reported set: evaluate on it, never tune on it)."""
    from edgeyolo.datasets import load_dataset

    return load_dataset(coco_val)


@pytest.fixture(scope="session")
def cpu_fp32_coco_val_result(cpu_fp32_bundle, coco_val_dataset):
    """cpu-fp32 on all of coco-val-500, evaluated once: the reference every full-set accuracy test compares with."""
    from edgeyolo.evaluate import evaluate
    from edgeyolo.runtime import load

    return evaluate(load(cpu_fp32_bundle), coco_val_dataset)


@pytest.fixture(scope="session")
def intel_fp16_bundle(yolov5n_pt, tmp_path_factory) -> Path:
    """intel-cpu-fp16 (OpenVINO, FP16 weights), built once: test_openvino checks it, test_tflite compares arm-fp16."""
    pytest.importorskip("openvino")
    return _build(yolov5n_pt, "intel-cpu-fp16", tmp_path_factory)


@pytest.fixture(scope="session")
def exported_onnx(yolov5n_pt, tmp_path_factory):
    """The 640x640 ONNX of each head ("decoded", "sigmoid"), exported once for every test that reads one."""
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model

    model = load_model(yolov5n_pt).model
    folder = tmp_path_factory.mktemp("onnx")
    return {head: export_onnx(model, folder / f"{head}.onnx", ExportOptions(head=head)) for head in ("decoded", "sigmoid")}


# Bundles of the other CPU backends, built once per session and shared by every module that uses them
# (the backend's own tests and the thread-safety tests).
@pytest.fixture(scope="session")
def ov_fp32_bundle(yolov5n_pt, tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    return _build(yolov5n_pt, "intel-cpu-fp32", tmp_path_factory)


@pytest.fixture(scope="session")
def ov_int8_bundle(yolov5n_pt, int8_calibration, tmp_path_factory) -> Path:
    pytest.importorskip("nncf")
    return _build(yolov5n_pt, "intel-cpu-int8", tmp_path_factory, int8_calibration)


@pytest.fixture(scope="session")
def arm_fp32_bundle(yolov5n_pt, tmp_path_factory) -> Path:
    pytest.importorskip("onnx2tf")
    return _build(yolov5n_pt, "arm-fp32", tmp_path_factory)


@pytest.fixture(scope="session")
def arm_fp16_bundle(yolov5n_pt, arm_fp32_bundle, tmp_path_factory) -> Path:
    """Built after arm-fp32, so it takes the FP16 model of that same conversion (onnx2tf writes both)."""
    pytest.importorskip("onnx2tf")
    return _build(yolov5n_pt, "arm-fp16", tmp_path_factory)


@pytest.fixture(scope="session")
def arm_int8_bundle(yolov5n_pt, int8_calibration, tmp_path_factory) -> Path:
    pytest.importorskip("onnx2tf")
    return _build(yolov5n_pt, "arm-int8", tmp_path_factory, int8_calibration)
