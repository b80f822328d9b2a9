"""The device install path: the wheel holds its data, and a clean venv with only ``[onnxruntime]`` runs a bundle.

The venv test is what a device does (no checkout, no torch): ``pip install edgeyolo-X.whl[onnxruntime]``,
then ``edgeyolo detect`` / ``bench`` on a cpu-fp32 bundle built here. pip fetches numpy, OpenCV and
ONNX Runtime (from its cache after the first run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from edgeyolo._version import __version__

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    (path,) = out.glob("edgeyolo-*.whl")
    return path


def test_wheel_holds_the_package_its_data_and_a_release_version(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(f"edgeyolo-{__version__}.dist-info/METADATA").decode())
        entry_points = archive.read(f"edgeyolo-{__version__}.dist-info/entry_points.txt").decode()
    for folder in ("targets", "calibration"):
        for path in (ROOT / folder).iterdir():
            assert f"edgeyolo/_data/{folder}/{path.name}" in names, path
    assert {"edgeyolo/__init__.py", "edgeyolo/runtime/detector.py", "edgeyolo/_optional.py"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert wheel.name == f"edgeyolo-{__version__}-py3-none-any.whl"
    assert "edgeyolo = edgeyolo.cli:main" in entry_points
    # the runtime's requirements carry no torch, no onnx, no tensorflow: those come only with an extra
    plain = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in plain if r.split()[0].lower().startswith(("torch", "onnx", "tensorflow"))], plain


def test_changelog_names_this_version():
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def _device_env() -> dict:
    """The environment of a process on a device: nothing pointing back into this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.mark.slow
def test_device_install_runs_a_bundle_without_torch(wheel, cpu_fp32_bundle, sample_images, tmp_path):
    import edgeyolo

    env_dir = tmp_path / "device-venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)  # a plain venv: none of this env's packages
    python, cli = env_dir / "bin" / "python", env_dir / "bin" / "edgeyolo"
    run = lambda *args: subprocess.run([str(a) for a in args], capture_output=True, text=True,  # noqa: E731
                                       cwd=tmp_path, env=_device_env(), timeout=900)
    install = run(python, "-m", "pip", "install", "-q", f"{wheel}[onnxruntime]")
    assert install.returncode == 0, install.stderr[-2000:]

    probe = run(python, "-c", "import edgeyolo, importlib.util as u; print(edgeyolo.__file__); "
                              "print(u.find_spec('torch') is None, u.find_spec('onnx') is None)")
    location, no_torch = probe.stdout.splitlines()
    assert str(env_dir) in location and no_torch == "True True", probe.stdout + probe.stderr

    detect = run(cli, "detect", cpu_fp32_bundle, sample_images[0], "--json")
    assert detect.returncode == 0, detect.stderr
    device = json.loads(detect.stdout)[0]["detections"]
    here = edgeyolo.load(cpu_fp32_bundle).detect(str(sample_images[0])).to_list()
    assert [d["class_name"] for d in device] == [d["class_name"] for d in here]
    for a, b in zip(device, here):
        assert max(abs(x - y) for x, y in zip(a["xyxy"], b["xyxy"])) < 0.5

    bench = run(cli, "bench", cpu_fp32_bundle, "--iters", "3", "--warmup", "1", "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["fps"] > 0, bench.stderr

    targets = run(cli, "targets")  # from the wheel's own data
    assert targets.returncode == 0 and "jetson-int8" in targets.stdout, targets.stderr

    build = run(cli, "build", "yolov5n.pt", "--target", "cpu-fp32")  # the workstation's job: one line, exit 2
    assert build.returncode == 2 and "pip install 'edgeyolo[export]'" in build.stderr, build.stderr
    assert "Traceback" not in build.stderr
