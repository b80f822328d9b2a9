"""The command line as a user meets it: real subprocesses, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def run_cli(*args, cwd=None, env=None):
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "edgeyolo.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=full_env)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(rc, stdout, stderr, pattern):
    assert rc == 2, (rc, stdout, stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], stderr


class _Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/edgeyolo-pwned",)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "random.pt").write_bytes(bytes(range(256)) * 20)  # not a zip, not a pickle
    torch.save({"model": _Evil()}, d / "evil.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, d / "notyolo.pt")
    (d / "empty").mkdir()
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return d


@pytest.mark.parametrize(
    "weights, target, message",
    [
        ("{bad}/missing.pt", "cpu-fp32", "no such weights file"),
        ("{bad}/random.pt", "cpu-fp32", "corrupt"),
        ("{bad}/evil.pt", "cpu-fp32", "refused"),
        ("{bad}/notyolo.pt", "cpu-fp32", "not a YOLOv5 detection checkpoint"),
        ("yolov9z", "cpu-fp32", "not a file and not a known weight name"),
        ("{weights}", "no-such-target", "unknown target 'no-such-target'"),
    ],
    ids=["missing", "corrupt", "malicious", "not-yolo", "unknown-name", "unknown-target"],
)
def test_build_bad_input(bad_files, yolov5n_pt, tmp_path, weights, target, message):
    out = tmp_path / "out"
    spec = weights.format(bad=bad_files, weights=yolov5n_pt)
    rc, stdout, stderr = run_cli("build", spec, "--target", target, "-o", out)
    assert_one_line_error(rc, stdout, stderr, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not Path("/tmp/edgeyolo-pwned").exists()


def test_build_rounds_imgsz_up_with_a_warning(yolov5n_pt, tmp_path):
    rc, _, stderr = run_cli("build", yolov5n_pt, "--target", "cpu-fp32", "--imgsz", "630", "-o", tmp_path / "b")
    assert rc == 0, stderr
    assert "warning:" in stderr and "updated to [640, 640]" in stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [1, 640, 640, 3]  # the engine takes the uint8 letterbox (NHWC)


@pytest.mark.parametrize(
    "source, message",
    [("{bad}/nowhere", "no such file or folder"), ("{bad}/empty", "no images or videos"),
     ("{bad}/corrupt.jpg", "not a readable image")],
    ids=["missing", "empty-folder", "corrupt-image"],
)
def test_detect_bad_input(cpu_fp32_bundle, bad_files, tmp_path, source, message):
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, source.format(bad=bad_files), "--save-dir", tmp_path / "o")
    assert_one_line_error(rc, stdout, stderr, message)
    assert not (tmp_path / "o").exists()


def test_detect_json_and_save_dir_skip_a_corrupt_file_in_a_folder(cpu_fp32_bundle, sample_images, bad_files, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for image in sample_images:
        shutil.copy(image, folder)
    shutil.copy(bad_files / "corrupt.jpg", folder)
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, folder, "--json", "--save-dir", tmp_path / "out")
    assert rc == 0, stderr
    assert "warning:" in stderr and "corrupt.jpg" in stderr
    results = json.loads(stdout)
    assert [Path(r["source"]).name for r in results] == ["bus.jpg", "zidane.jpg"]
    assert {d["class_name"] for d in results[0]["detections"]} == {"person", "bus"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bus.jpg", "zidane.jpg"]


def test_detect_with_weights_builds_a_cached_reference(yolov5n_pt, sample_images, tmp_path):
    env = {"EDGEYOLO_CACHE": str(tmp_path / "cache")}
    rc, stdout, stderr = run_cli("detect", yolov5n_pt, sample_images[1], env=env)
    assert rc == 0, stderr
    assert "tie" in stdout and "person" in stdout
    assert len(list((tmp_path / "cache" / "bundles").iterdir())) == 1


def test_detect_video(cpu_fp32_bundle, sample_images, tmp_path):
    import cv2

    frame = cv2.resize(cv2.imread(str(sample_images[1])), (640, 360))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (640, 360))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, video, "--json", "--save-dir", tmp_path / "out")
    assert rc == 0, stderr
    result = json.loads(stdout)[0]
    assert len(result["frames"]) == 3 and all(f["detections"] for f in result["frames"])
    assert (tmp_path / "out" / "clip.mp4").stat().st_size > 0


def test_tampered_bundle(cpu_fp32_bundle, tmp_path, coco_val):
    copy = tmp_path / "bundle"
    shutil.copytree(cpu_fp32_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["checksums"]["model.onnx"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for args in (["eval", copy, "--data", coco_val], ["detect", copy, coco_val / "images"], ["bench", copy]):
        assert_one_line_error(*run_cli(*args), "checksum mismatch")


@pytest.fixture
def small_dataset(coco_val, bad_files, tmp_path):
    """Five real labelled images plus one corrupt image."""
    root = tmp_path / "small"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image in sorted((coco_val / "images").glob("*.jpg"))[:5]:
        shutil.copy(image, root / "images")
        shutil.copy(coco_val / "labels" / f"{image.stem}.txt", root / "labels")
    shutil.copy(bad_files / "corrupt.jpg", root / "images" / "000000000000.jpg")
    return root


def test_eval_json_counts_a_skipped_corrupt_image(cpu_fp32_bundle, small_dataset):
    rc, stdout, stderr = run_cli("eval", cpu_fp32_bundle, "--data", small_dataset, "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert {"map50_95", "map50", "images", "boxes"} <= set(result)
    assert result["images"] == 5 and result["skipped"] == 1
    assert 0 < result["map50_95"] <= result["map50"] <= 1
    assert "warning:" in stderr


def test_eval_malformed_label_names_file_and_line(cpu_fp32_bundle, small_dataset):
    label = sorted((small_dataset / "labels").glob("*.txt"))[2]
    lines = label.read_text().splitlines()
    label.write_text("\n".join(lines[:1] + ["0 0.5 0.5 oops 0.2"] + lines[1:]) + "\n")
    rc, stdout, stderr = run_cli("eval", cpu_fp32_bundle, "--data", small_dataset)
    assert_one_line_error(rc, stdout, stderr, f"{label.name}:2: malformed label line")


@pytest.mark.parametrize("layout", ["missing", "empty", "no-labels"])
def test_eval_bad_dataset(cpu_fp32_bundle, tmp_path, coco_val, layout):
    data = tmp_path / "data"
    if layout != "missing":
        (data / "images").mkdir(parents=True)
    if layout == "no-labels":
        shutil.copy(next((coco_val / "images").glob("*.jpg")), data / "images")
    message = {"missing": "no such dataset", "empty": "no images found", "no-labels": "no label files"}[layout]
    assert_one_line_error(*run_cli("eval", cpu_fp32_bundle, "--data", data), message)


def test_bench_json(cpu_fp32_bundle):
    rc, stdout, stderr = run_cli("bench", cpu_fp32_bundle, "--iters", "5", "--warmup", "1", "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["fps"] > 0 and result["peak_rss_mb"] > 0
    assert set(result["latency_ms"]) >= {"p50", "p90", "p99"}
    assert {"read", "letterbox", "to_input", "inference", "decode", "nms", "scale", "preprocess", "postprocess",
            "host"} == set(result["stages_ms"])
    assert result["backend"] == "onnxruntime" and result["threads"]


def test_bench_from_disk_times_reading(cpu_fp32_bundle, sample_images):
    rc, stdout, stderr = run_cli("bench", cpu_fp32_bundle, "--images", sample_images[0], "--from-disk", "--iters", "3",
                                 "--warmup", "1", "--json")
    assert rc == 0, stderr
    stages = json.loads(stdout)["stages_ms"]
    assert stages["read"]["p50"] > 0 and stages["to_input"]["p50"] < stages["inference"]["p50"]
    assert stages["host"]["mean"] == pytest.approx(sum(stages[s]["mean"] for s in (
        "read", "letterbox", "to_input", "decode", "nms", "scale")), abs=0.01)


def test_targets_and_info(cpu_fp32_bundle):
    rc, stdout, _ = run_cli("targets", "--json")
    names = {t["name"] for t in json.loads(stdout)}
    assert rc == 0 and "cpu-fp32" in names
    rc, stdout, _ = run_cli("info", cpu_fp32_bundle)
    assert rc == 0 and "checksums verified" in stdout


def test_export_command(yolov5n_pt, tmp_path):
    """--head, --dynamic-batch, --opset and --imgsz all reach the file."""
    import onnx
    import onnxruntime as ort

    from edgeyolo.export import read_metadata

    out = tmp_path / "m.onnx"
    rc, _, stderr = run_cli("export", yolov5n_pt, "--imgsz", "320", "--head", "sigmoid", "--dynamic-batch",
                            "--opset", "13", "-o", out)
    assert rc == 0, stderr
    meta = read_metadata(out)
    assert meta["imgsz"] == [320, 320] and meta["head"] == "sigmoid" and meta["dynamic_batch"] == "true"
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == 13
    batch, *rest = graph.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and [d.dim_value for d in rest] == [3, 320, 320]
    x = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert y.shape == (2, 6300, 85) and 0 <= y.min() and y.max() <= 1  # sigmoid head: no pixel coordinates


def test_build_with_a_target_file_of_ones_own(yolov5n_pt, tmp_path):
    """--target path/mine.toml: any TOML file is a target, its settings used as written."""
    from edgeyolo.targets import targets_dir

    mine = tmp_path / "mine.toml"
    text = (targets_dir() / "cpu-fp32.toml").read_text()
    mine.write_text(text.replace('name = "cpu-fp32"', 'name = "mine"').replace("imgsz = 640", "imgsz = [256, 320]"))
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    result = CliRunner().invoke(cli, ["build", str(yolov5n_pt), "--target", str(mine), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "mine" and manifest["input"]["shape"] == [1, 256, 320, 3]
    assert manifest["preprocess"]["imgsz"] == [256, 320]
    assert_one_line_error(*run_cli("build", yolov5n_pt, "--target", tmp_path / "nowhere.toml", "-o", tmp_path / "c"),
                          "no such target file")


def test_detect_glob_with_conf_and_iou(cpu_fp32_bundle, sample_images, tmp_path):
    """A glob pattern expands to its files; --conf and --iou reach NMS (both differ from the defaults here)."""
    import edgeyolo

    pattern = str(sample_images[0].parent / "*.jpg")
    rc, stdout, stderr = run_cli("detect", cpu_fp32_bundle, pattern, "--json", "--conf", "0.1", "--iou", "0.9")
    assert rc == 0, stderr
    results = json.loads(stdout)
    assert [Path(r["source"]).name for r in results] == ["bus.jpg", "zidane.jpg"]
    detector = edgeyolo.load(cpu_fp32_bundle)
    for result, image in zip(results, sample_images):
        expected = detector.detect(image, conf=0.1, iou=0.9).to_list()
        assert result["detections"] == expected
        assert len(expected) > len(detector.detect(image, conf=0.1)) > len(detector.detect(image))
    assert_one_line_error(*run_cli("detect", cpu_fp32_bundle, str(tmp_path / "*.jpg")), "matches no files")


def test_eval_weights_per_class(yolov5n_pt, cpu_fp32_bundle, small_dataset):
    """eval WEIGHTS builds (once, cached) the cpu-fp32 reference; --per-class adds AP per class."""
    from click.testing import CliRunner

    import edgeyolo
    from edgeyolo.cli import cli
    from edgeyolo.datasets import load_dataset
    from edgeyolo.evaluate import evaluate

    result = CliRunner().invoke(cli, ["eval", str(yolov5n_pt), "--data", str(small_dataset), "--per-class", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = evaluate(edgeyolo.load(cpu_fp32_bundle), load_dataset(small_dataset), per_class=True)
    assert got["map50_95"] == pytest.approx(expected.map50_95, abs=1e-9) and got["images"] == 5
    assert got["per_class"] == pytest.approx(expected.per_class, abs=1e-9) and "person" in got["per_class"]
    table = CliRunner().invoke(cli, ["eval", str(cpu_fp32_bundle), "--data", str(small_dataset), "--per-class"])
    assert table.exit_code == 0 and "AP50-95" in table.stdout
    assert f"{expected.per_class['person'] * 100:.2f}" in table.stdout


def test_compare_json(cpu_fp32_bundle, small_dataset):
    rc, stdout, stderr = run_cli("compare", cpu_fp32_bundle, "--rounds", "1", "--iters", "3", "--data", small_dataset,
                                 "--json")
    assert rc == 0, stderr
    (row,) = json.loads(stdout)
    assert row["target"] == "cpu-fp32" and row["fps"] > 0 and row["size_mb"] > 1
    assert 0 < row["map50_95"] <= row["map50"] <= 100
    assert row["peak_rss_mb"] < 1000  # a bundle's benchmark process loads no torch


def test_bench_process_never_imports_torch(cpu_fp32_bundle):
    """The whole bench command, run in-process, finishes (exit 0, a result) with torch never imported."""
    code = ("import sys\nfrom edgeyolo.cli import cli\n"
            f"sys.argv = ['edgeyolo', 'bench', {str(cpu_fp32_bundle)!r}, '--iters', '2', '--warmup', '0', '--json']\n"
            "try:\n    cli()\nexcept SystemExit as done:\n    status = done.code\nelse:\n    status = 'returned'\n"
            "print('EXIT', status, 'TORCH', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report, _, verdict = result.stdout.rpartition("EXIT")
    assert verdict.split() in (["0", "TORCH", "False"], ["None", "TORCH", "False"]), result.stdout + result.stderr
    bench = json.loads(report)
    assert bench["iters"] == 2 and bench["fps"] > 0 and bench["backend"] == "onnxruntime"
