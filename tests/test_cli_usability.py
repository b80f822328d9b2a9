"""What a newcomer meets on the command line: --imgsz forms, progress notes for long steps, help texts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgeyolo.cli import cli
from edgeyolo.cli.common import IMGSZ
from edgeyolo.progress import step

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run([sys.executable, "-m", "edgeyolo.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=300, env=full_env)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("text, size", [("320", (320, 320)), ("320,480", (320, 480)), ("320x480", (320, 480)),
                                        ("320X480", (320, 480)), (" 480 , 640 ", (480, 640))])
def test_imgsz_forms(text, size):
    assert IMGSZ.convert(text, None, None) == size


@pytest.mark.parametrize("text", ["32a0", "0", "320,480,640", "", "-320", "320x"])
def test_imgsz_rejects_what_is_not_a_size(text):
    with pytest.raises(click.BadParameter, match="not an image size"):
        IMGSZ.convert(text, None, None)


def test_build_with_hxw_says_what_each_long_step_does(yolov5n_pt, tmp_path):
    rc, _, stderr = run_cli("build", yolov5n_pt, "--target", "cpu-fp32", "--imgsz", "320x480", "-o", tmp_path / "b")
    assert rc == 0, stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["input"]["shape"] == [1, 320, 480, 3]
    assert "exporting yolov5n.pt to ONNX at 320x480" in stderr
    assert "building the onnxruntime engine for cpu-fp32: done in" in stderr


@pytest.mark.slow  # an engine build of its own; CI's full run keeps it
def test_detect_weights_says_it_builds_a_cached_bundle_and_where(yolov5n_pt, sample_images, tmp_path):
    env = {"EDGEYOLO_CACHE": str(tmp_path / "cache")}
    rc, _, first = run_cli("detect", yolov5n_pt, sample_images[0], env=env)
    assert rc == 0, first
    (cached,) = (tmp_path / "cache" / "bundles").iterdir()
    assert f"building a cpu-fp32 bundle for yolov5n.pt once, cached in {cached}" in first
    rc, _, second = run_cli("detect", yolov5n_pt, sample_images[0], env=env)
    assert rc == 0 and "building" not in second, second


def test_step_notes_start_and_duration_and_stays_quiet_for_python_callers(caplog):
    with caplog.at_level(logging.INFO, logger="edgeyolo.progress"):
        with step("converting"):
            pass
        with pytest.raises(RuntimeError), step("failing"):
            raise RuntimeError("boom")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "converting ..." and messages[1].startswith("converting: done in ")
    assert messages[2:] == ["failing ..."]
    quiet = subprocess.run([sys.executable, "-c", "from edgeyolo.progress import step\nwith step('x'): pass"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert quiet.returncode == 0 and quiet.stderr == "", "a Python caller hears nothing unless it asks"


@pytest.mark.parametrize("command, option", [("compare", "--iters"), ("bench", "--iters"), ("bench", "--warmup"),
                                             ("detect", "--save-txt"), ("detect", "--save-json")])
def test_every_option_has_help(command, option):
    params = {p.opts[0]: p for p in cli.commands[command].params if isinstance(p, click.Option)}
    assert params[option].help
    assert option in CliRunner().invoke(cli, [command, "--help"]).output
