"""Every command, run with optional packages made unimportable: one line naming the extra, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with the top-level packages named in argv[1] hidden, as in an install without their extra.
RUNNER = """
import sys
hidden = set(sys.argv[1].split(","))

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from edgeyolo.cli import main
sys.argv = ["edgeyolo"] + sys.argv[2:]
main()
"""


def run_without(hidden: list[str], *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(hidden), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, extra: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert f"pip install 'edgeyolo[{extra}]'" in lines[0]


@pytest.fixture(scope="module")
def data_yaml(coco128, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "coco128.yaml"
    path.write_text(f"path: {coco128}\nval: images\nnames: {{0: person}}\n")
    return path


@pytest.mark.parametrize("hidden, command", [
    (["torch"], "export"),
    (["onnx"], "export"),
    (["torch", "onnx"], "build"),
    (["torch"], "detect"),
    (["torch"], "eval"),
])
def test_weights_commands_name_the_export_extra(hidden, command, yolov5n_pt, sample_images, coco128, tmp_path):
    args = {
        "export": ["export", yolov5n_pt, "-o", tmp_path / "m.onnx"],
        "build": ["build", yolov5n_pt, "--target", "cpu-fp32", "-o", tmp_path / "b"],
        "detect": ["detect", yolov5n_pt, sample_images[0]],
        "eval": ["eval", yolov5n_pt, "--data", coco128, "--limit", "1"],
    }[command]
    result = run_without(hidden, *args)
    assert_one_line(result, "export")
    assert not any(tmp_path.iterdir()), "nothing may be written"


@pytest.mark.parametrize("command", ["detect", "bench"])
def test_runtime_without_its_backend_names_the_backend_extra(command, cpu_fp32_bundle, sample_images):
    args = {"detect": ["detect", cpu_fp32_bundle, sample_images[0]],
            "bench": ["bench", cpu_fp32_bundle, "--iters", "1", "--warmup", "0"]}[command]
    assert_one_line(run_without(["onnxruntime"], *args), "onnxruntime")


def test_eval_without_the_evaluator_names_the_eval_extra(cpu_fp32_bundle, coco128):
    result = run_without(["faster_coco_eval", "pycocotools"], "eval", cpu_fp32_bundle, "--data", coco128,
                         "--limit", "2")
    assert_one_line(result, "eval")


def test_a_data_yaml_without_pyyaml_names_the_eval_extra(cpu_fp32_bundle, data_yaml):
    assert_one_line(run_without(["yaml"], "eval", cpu_fp32_bundle, "--data", data_yaml), "eval")


def test_commands_that_need_no_optional_package_still_work(cpu_fp32_bundle):
    hidden = ["torch", "onnx", "onnxslim", "onnxruntime", "openvino", "tensorflow", "faster_coco_eval", "yaml"]
    for args in (["targets"], ["info", cpu_fp32_bundle], ["--version"]):
        result = run_without(hidden, *args)
        assert result.returncode == 0, result.stderr


def test_a_missing_package_inside_a_command_is_caught_by_the_cli_safety_net():
    """A plain ``import onnx`` that require() does not guard still gives the one line, not a traceback."""
    from click.testing import CliRunner

    from edgeyolo.cli.common import cli

    @cli.command(name="_needs-onnx", hidden=True)
    def needs_onnx():
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    @cli.command(name="_needs-other", hidden=True)
    def needs_other():
        raise ModuleNotFoundError("No module named 'not_ours'", name="not_ours")

    try:
        result = CliRunner().invoke(cli, ["_needs-onnx"])
        assert result.exit_code == 2
        assert "pip install 'edgeyolo[export]'" in result.output
        other = CliRunner().invoke(cli, ["_needs-other"])
        assert isinstance(other.exception, ModuleNotFoundError), "an unknown module is a bug, shown as is"
    finally:
        cli.commands.pop("_needs-onnx")
        cli.commands.pop("_needs-other")
