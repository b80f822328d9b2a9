"""Hostile files and options: one clear line and exit 2 (or the correct result), no traceback, no debris.

Targets, checkpoints, label files, data yamls, COCO jsons, images, calibration archives and
command-line options, each crafted here; parsers and NMS are also fuzzed with hypothesis.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import assert_one_line_error, run_cli

from edgeyolo.datasets import load_dataset, read_yolo_labels
from edgeyolo.errors import EdgeYoloError
from edgeyolo.runtime.images import read_image
from edgeyolo.runtime.postprocess import non_max_suppression
from edgeyolo.targets import Target, load_target

ROOT = Path(__file__).resolve().parents[1]
GOOD_TARGET = {"name": "mine", "backend": "onnxruntime", "precision": "fp32", "imgsz": 640, "batch": 1,
               "head": "decoded", "opset": 17}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_target(path: Path, top: dict, tables: dict | None = None) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, table in (tables or {}).items():
        lines += [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("change, tables, pattern", [
    ({"imgsz": 100000}, None, "imgsz must be between 32 and 4096"),
    ({"imgsz": True}, None, "imgsz must be an integer"),
    ({"imgsz": [640]}, None, "imgsz must be a list of 2 integers"),
    ({"batch": 0}, None, "batch must be between 1 and 64"),
    ({"opset": 1}, None, "opset must be between 11 and 20"),
    ({"opset": 999}, None, "opset must be between 11 and 20"),
    ({"name": "../escape"}, None, "'../escape' is not allowed"),
    ({"name": "/abs"}, None, "is not allowed"),
    ({"precision": "int4"}, None, "precision must be one of"),
    ({"backend": 5}, None, "backend must be a string"),
    ({"backend": "pickle"}, None, "backend must be one of"),
    ({"head": "raw"}, None, "head must be one of"),
    ({"imgsize": 320}, None, "unknown key(s): imgsize"),
    ({"dynamic_batch": "yes"}, None, "dynamic_batch must be true or false"),
    ({}, {"onnxruntime": {"threads": 4}}, "unknown key(s) in onnxruntime: threads"),
    ({}, {"onnxruntime": {"intra_op_threads": "many"}}, "intra_op_threads must be an integer"),
    ({}, {"onnxruntime": {"graph_optimization": "max"}}, "graph_optimization must be one of"),
    ({}, {"calibration": {"seed": -1}}, "calibration.seed must be at least 0"),
    ({}, {"calibration": {"sise": 10}}, "unknown key(s) in calibration: sise"),
    ({"backend": "openvino"}, {"openvino": {"preset": "fast"}}, "openvino.preset must be one of"),
    ({"backend": "tflite"}, {"tflite": {"io_dtype": "uint4"}}, "tflite.io_dtype must be one of"),
    ({"backend": "tensorrt"}, {"tensorrt": {"workspace": 1}}, "unknown [tensorrt] option"),
], ids=lambda v: str(v)[:40])
def test_malformed_target_is_one_line(tmp_path, change, tables, pattern):
    path = write_target(tmp_path / "mine.toml", {**GOOD_TARGET, **change}, tables)
    with pytest.raises(EdgeYoloError) as error:
        load_target(path)
    assert pattern in str(error.value) and "\n" not in str(error.value)


def test_target_missing_backend_and_binary_target(tmp_path):
    with pytest.raises(EdgeYoloError, match="'backend' is missing"):
        load_target(write_target(tmp_path / "a.toml", {"precision": "fp32"}))
    (tmp_path / "b.toml").write_bytes(bytes(range(256)))
    with pytest.raises(EdgeYoloError, match="not valid TOML"):
        load_target(tmp_path / "b.toml")


def test_good_target_file_loads(tmp_path):
    target = load_target(write_target(tmp_path / "mine.toml", {**GOOD_TARGET, "imgsz": [320, 480]},
                                      {"onnxruntime": {"intra_op_threads": 2}}))
    assert isinstance(target, Target) and target.imgsz == (320, 480) and target.backend_options["intra_op_threads"] == 2


_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12) | st.lists(st.integers(-10, 10**5), max_size=3)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_target_loads_or_is_refused_cleanly(tmp_path, data):
    keys = list(GOOD_TARGET) + ["dynamic_batch", "dynamic_shape", "description", "unknown"]
    top = dict(GOOD_TARGET)
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        value = data.draw(_SCALARS)
        if value is None:
            top.pop(key, None)
        else:
            top[key] = value
    path = write_target(tmp_path / "fuzz.toml", top)
    try:
        target = load_target(path)
    except EdgeYoloError as exc:
        assert "\n" not in str(exc)
        return
    assert 32 <= min(target.imgsz) and max(target.imgsz) <= 4096 and 1 <= target.batch <= 64
    assert "/" not in target.name and target.head in ("decoded", "sigmoid")


def test_target_name_cannot_escape_the_working_folder(tmp_path, yolov5n_pt):
    target = write_target(tmp_path / "evil.toml", {**GOOD_TARGET, "name": "../../escaped"})
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(*run_cli("build", yolov5n_pt, "-t", target, cwd=work), "is not allowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.toml", "work"] and not list(work.iterdir())


# --------------------------------------------------------------------------- checkpoints
_CRAFT = textwrap.dedent("""
    import sys, torch
    from edgeyolo.model.checkpoint import OWN_FORMAT, load_checkpoint
    out = sys.argv[1]
    yaml = load_checkpoint(sys.argv[2]).model.yaml
    nested = []
    for _ in range(20000):
        nested = [nested]
    sys.setrecursionlimit(100000)
    half = torch.zeros(1, dtype=torch.float16)
    files = {
        "stride0": {"format": OWN_FORMAT, "yaml": yaml, "state_dict": {"model.0.conv.weight": half.expand(8_000_000_000)}},
        "stride0-small": {"format": OWN_FORMAT, "yaml": yaml,
                          "state_dict": {"model.0.conv.weight": half.expand(16, 3, 6, 6)}},
        "deep": {"model": nested},
        "deep-state": {"format": OWN_FORMAT, "yaml": yaml, "state_dict": {"w": nested}},
        "list": [1, 2, 3],
        "string": "not a model",
        "state-list": {"format": OWN_FORMAT, "yaml": yaml, "state_dict": [1, 2]},
        "state-string": {"format": OWN_FORMAT, "yaml": yaml, "state_dict": {"w": "x"}},
        "yaml-list": {"format": OWN_FORMAT, "yaml": [1], "state_dict": {}},
    }
    for name, payload in files.items():
        torch.save(payload, f"{out}/{name}.pt")
""")

# Loads each crafted file in one fresh process with a 6 GB address-space cap, then reports its peak RSS.
_LOAD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    from edgeyolo.bench import peak_rss_mb
    from edgeyolo.errors import EdgeYoloError
    from edgeyolo.model.checkpoint import load_checkpoint
    results = {}
    for path in sys.argv[1:]:
        try:
            load_checkpoint(path)
            results[path] = "loaded"
        except EdgeYoloError as exc:
            results[path] = "refused: " + str(exc)
    results["peak_rss_mb"] = peak_rss_mb()  # VmHWM: ru_maxrss would carry the (big) pytest parent's peak over exec
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def hostile_checkpoints(tmp_path_factory, yolov5n_pt) -> Path:
    folder = tmp_path_factory.mktemp("hostile-pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _CRAFT, str(folder), str(yolov5n_pt)], check=True, env=env, timeout=300)
    with zipfile.ZipFile(folder / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with zf.open("archive/data/0", "w") as entry:
            chunk = bytes(1 << 20)
            for _ in range(256):
                entry.write(chunk)
    return folder


def test_hostile_checkpoints_are_refused_within_bounded_memory(hostile_checkpoints):
    paths = sorted(str(p) for p in hostile_checkpoints.glob("*.pt"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _LOAD, *paths], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = results.pop("peak_rss_mb")
    assert len(results) == 10
    for path, outcome in results.items():
        assert outcome.startswith("refused: ") and "\n" not in outcome, (path, outcome)
    assert "stride" in results[str(hostile_checkpoints / "stride0-small.pt")]
    assert "zip bomb" in results[str(hostile_checkpoints / "bomb.pt")]
    assert peak < 600, f"refusing the hostile checkpoints peaked at {peak:.0f} MB RSS"


def test_hostile_checkpoint_through_the_cli(hostile_checkpoints, tmp_path):
    assert_one_line_error(*run_cli("build", hostile_checkpoints / "stride0.pt", "-t", "cpu-fp32", "-o", tmp_path / "b"),
                          "refused")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- labels, yamls, COCO json
@pytest.fixture
def one_image_set(tmp_path, sample_images) -> Path:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "bus.jpg").write_bytes(sample_images[0].read_bytes())
    (root / "labels" / "bus.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return root


@pytest.mark.parametrize("content, pattern", [
    (bytes(range(256)) * 4, "not a text label file"),
    (b"0 0.5 0.5 0.2\x00 0.2\n", "not a text label file"),
    (b"0 nan 0.5 0.2 0.2\n", "malformed label line"),
    (b"0 0.5 0.5 inf 0.2\n", "malformed label line"),
    (b"-1 0.5 0.5 0.2 0.2\n", "malformed label line"),
    (b"1.5 0.5 0.5 0.2 0.2\n", "malformed label line"),
])
def test_malformed_label_file(one_image_set, content, pattern):
    (one_image_set / "labels" / "bus.txt").write_bytes(content)
    with pytest.raises(EdgeYoloError, match=pattern):
        load_dataset(one_image_set)


def test_class_out_of_range_is_refused(one_image_set):
    (one_image_set / "labels" / "bus.txt").write_text("500 0.5 0.5 0.2 0.2\n")
    dataset = load_dataset(one_image_set)
    with pytest.raises(EdgeYoloError, match="class 500 is out of range for a model with 80 classes"):
        dataset.check_classes(80)
    dataset.check_classes(501)


def test_class_out_of_range_through_eval(one_image_set, cpu_fp32_bundle):
    (one_image_set / "labels" / "bus.txt").write_text("500 0.5 0.5 0.2 0.2\n")
    assert_one_line_error(*run_cli("eval", cpu_fp32_bundle, "--data", one_image_set), "class 500 is out of range")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="0123456789 .-e\nnaif", max_size=80))
def test_fuzzed_label_lines_parse_or_are_refused(tmp_path, text):
    path = tmp_path / "fuzz.txt"
    path.write_text(text)
    try:
        boxes, classes = read_yolo_labels(path)
    except EdgeYoloError as exc:
        assert "\n" not in str(exc).replace(repr("\n"), "")
        return
    assert boxes.shape == (len(classes), 4) and np.isfinite(boxes).all() and (classes >= 0).all()


@pytest.mark.parametrize("text, pattern", [
    ("val: [images]\n", "val must be a string"),
    ("val: images\nnames: {0: a, 5: b}\n", "names must map the indices"),
    ("val: images\nnames: 7\n", "names must be a list"),
    ("val: images\npath: 3\n", "path must be a string"),
    ("[[[[", "not valid YAML"),
    ("- just\n- a list\n", "needs a 'val' entry"),
])
def test_malformed_data_yaml(one_image_set, text, pattern):
    (one_image_set / "data.yaml").write_text(text)
    with pytest.raises(EdgeYoloError, match=pattern):
        load_dataset(one_image_set / "data.yaml")


@pytest.mark.parametrize("content, pattern", [
    (b"\xff\xfe\x00train: images\n", "not valid YAML"),  # not UTF-8
    (b"train: images\n" + b"#" * (1 << 20), "data yaml larger than"),
    (b"[" * 100_000, "not valid YAML"),
], ids=["not-utf8", "oversize", "deep"])
def test_training_data_yaml_is_read_as_untrusted(tmp_path, content, pattern):
    """``train --data`` reads its yaml through the same bounded reader as every other yaml."""
    from edgeyolo.train.data import _yaml_splits

    (tmp_path / "data.yaml").write_bytes(content)
    with pytest.raises(EdgeYoloError, match=pattern):
        _yaml_splits(tmp_path / "data.yaml")


def test_label_class_beyond_the_data_yaml_names(one_image_set):
    (one_image_set / "labels" / "bus.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    (one_image_set / "data.yaml").write_text("val: images\nnames: [a, b]\n")
    with pytest.raises(EdgeYoloError, match="class 5 is out of range for the 2 class names"):
        load_dataset(one_image_set / "data.yaml").check_classes(80)


COCO = {"images": [{"id": 1, "file_name": "bus.jpg"}], "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 80]}]}


@pytest.mark.parametrize("change, pattern", [
    (lambda d: d["annotations"][0].__setitem__("category_id", 99), "category_id 99, which is not in its categories"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2]), "bbox must be"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, "w", 4]), "bbox must be a finite number"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, -3, 4]), "bbox must be at least 0"),
    (lambda d: d.__setitem__("annotations", {"a": 1}), "'annotations' must be a list"),
    (lambda d: d.__setitem__("images", [{"id": 1}]), "'images' must be a list of objects with id, file_name"),
    (lambda d: d.__setitem__("categories", "person"), "'categories' must be a list"),
    (lambda d: d["images"].append({"id": 1, "file_name": "x.jpg"}), "needs a unique id"),
])
def test_malformed_coco_json(one_image_set, change, pattern):
    data = json.loads(json.dumps(COCO))
    change(data)
    (one_image_set / "instances.json").write_text(json.dumps(data))
    with pytest.raises(EdgeYoloError, match=pattern):
        load_dataset(one_image_set / "instances.json")


def test_good_coco_json_loads(one_image_set):
    (one_image_set / "instances.json").write_text(json.dumps(COCO))
    dataset = load_dataset(one_image_set / "instances.json")
    assert dataset.samples[0].boxes.tolist() == [[10, 10, 60, 90]]


# --------------------------------------------------------------------------- images
def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100000, 100000), (30000, 30000)])
def test_image_header_claiming_a_huge_size(tmp_path, size):
    path = tmp_path / "huge.png"
    path.write_bytes(png_claiming(*size))
    with pytest.raises(EdgeYoloError, match="not a readable image"):
        read_image(path)


# --------------------------------------------------------------------------- options and sources (CLI)
@pytest.mark.parametrize("option, pattern", [
    (["--max-det", "-1"], "max_det must be a positive integer"),
    (["--max-det", "0"], "max_det must be a positive integer"),
    (["--conf", "nan"], "conf must be a number between 0 and 1"),
    (["--iou", "1.5"], "iou must be a number between 0 and 1"),
])
def test_nonsense_detect_options(cpu_fp32_bundle, sample_images, option, pattern):
    assert_one_line_error(*run_cli("detect", cpu_fp32_bundle, sample_images[0], *option), pattern)


def test_detector_refuses_nonsense_thresholds(cpu_fp32_bundle, images):
    import edgeyolo

    detector = edgeyolo.load(cpu_fp32_bundle)
    for kwargs in ({"conf": float("nan")}, {"max_det": -1}, {"iou": -0.1}, {"max_det": 2.5}):
        with pytest.raises(EdgeYoloError):
            detector.detect(images[0], **kwargs)
    assert len(detector.detect(images[0], max_det=1)) == 1


def test_bench_images_on_a_folder_of_videos(cpu_fp32_bundle, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"not a video")
    assert_one_line_error(*run_cli("bench", cpu_fp32_bundle, "--images", folder, "--iters", "1"),
                          "no images to benchmark on")


def test_corrupt_video_in_a_folder_is_warned_about(cpu_fp32_bundle, sample_images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "bus.jpg").write_bytes(sample_images[0].read_bytes())
    (folder / "broken.mp4").write_bytes(b"\x00" * 1000)
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, folder, "--json")
    assert rc == 0, stderr
    assert "broken.mp4" in stderr and "not a readable video" in stderr
    assert [r["source"] for r in json.loads(stdout)] == [str(folder / "bus.jpg")]


# --------------------------------------------------------------------------- calibration archives
def test_named_set_that_fails_its_check_leaves_no_unpack_folder(tmp_path, monkeypatch, sample_images):
    from edgeyolo.calibration import fetch_named_set

    monkeypatch.setenv("EDGEYOLO_CACHE", str(tmp_path))
    root = tmp_path / "calibration"
    root.mkdir()
    with zipfile.ZipFile(root / "coco128.zip", "w") as zf:
        zf.write(sample_images[0], "coco128/images/bus.jpg")
    with pytest.raises(EdgeYoloError, match="do not match the coco128 set"):
        fetch_named_set("coco128")
    assert sorted(p.name for p in root.iterdir()) == ["coco128.zip"]


# --------------------------------------------------------------------------- NMS
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 200), nc=st.integers(1, 5),
       conf=st.floats(0.0, 1.0), iou=st.floats(0.0, 1.0), max_det=st.integers(1, 50))
def test_nms_properties(seed, n, nc, conf, iou, max_det):
    rng = np.random.default_rng(seed)
    pred = np.zeros((n, 5 + nc), dtype=np.float32)
    pred[:, 0:2] = rng.uniform(0, 640, (n, 2))
    pred[:, 2:4] = rng.uniform(1, 200, (n, 2))
    pred[:, 4:] = rng.uniform(0, 1, (n, 1 + nc))
    rows = non_max_suppression(pred, conf, iou, max_det)
    assert rows.shape[1] == 6 and len(rows) <= max_det
    assert (rows[:, 4] >= conf).all() and (np.diff(rows[:, 4]) <= 0).all()  # above threshold, best first
    for c in set(rows[:, 5].tolist()):
        boxes = rows[rows[:, 5] == c, :4]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert _iou(boxes[i], boxes[j]) <= iou + 1e-5
    # the best-scoring candidate always survives
    scores = pred[:, 5:] * pred[:, 4:5] if n else np.zeros((0, nc))
    if n and scores.max() > conf:
        assert np.isclose(rows[:, 4].max(), scores.max(), rtol=1e-5)


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
