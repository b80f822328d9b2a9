"""The device side stays installable and runnable on Python 3.8 (JetPack 5: Ubuntu 20.04, TensorRT 8.5).

The workstation side (export, training, TFLite/OpenVINO builds) needs 3.10; what a Jetson
runs — the runtime, the backends, the bundle, targets, and the CLI commands ``build BUNDLE``,
``detect``, ``eval``, ``bench`` — must not use newer syntax or library calls. vermin checks
that statically; a Python 3.8 interpreter, where one is installed, compiles every file too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgeyolo"
DEVICE_MIN = "3.8"

# What a device imports (edgeyolo.build, export, model, quantize, train, optimize, compare: workstation only).
DEVICE_PATHS = (
    "__init__.py", "_version.py", "errors.py", "log.py", "bundle.py", "targets.py", "portable.py",
    "calibration.py", "datasets.py", "evaluate.py", "bench.py", "gate.py", "sources.py",
    "runtime", "backends/__init__.py", "backends/tensorrt.py", "backends/trt", "backends/onnxruntime.py",
    "backends/openvino.py", "backends/tflite/__init__.py", "backends/tflite/engine.py", "backends/tflite/head.py",
    "cli",
)


def device_files() -> list[Path]:
    files = []
    for entry in DEVICE_PATHS:
        path = PACKAGE / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    return files


def _vermin(*args: str, files) -> subprocess.CompletedProcess:
    if not _has_module("vermin"):
        pytest.skip("vermin is not installed (pip install 'edgeyolo[dev]')")
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={DEVICE_MIN}-", "--no-tips", "--violations",
               "--no-parse-comments", *args, *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _postponed_annotations(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)


def test_device_modules_need_no_newer_python_than_3_8():
    """Syntax, library calls and keyword arguments (``zip(strict=)``, ``removeprefix``, ``match``, ...)."""
    result = _vermin(files=device_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_annotations_evaluated_at_import_are_3_8_too():
    """Without ``from __future__ import annotations`` Python evaluates annotations when it defines
    a function, so ``list[int]`` or ``str | None`` there fails to import on 3.8."""
    evaluated = [f for f in device_files() if not _postponed_annotations(f)]
    assert evaluated  # __init__ files and the like: checked with their annotations evaluated
    result = _vermin("--eval-annotations", files=evaluated)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_catches_what_it_is_for(tmp_path):
    """The checks above can fail: each construct here needs Python > 3.8."""
    samples = {
        "strict_zip.py": "pairs = list(zip([1], [2], strict=True))\n",
        "prefix.py": "name = 'v1.2'.removeprefix('v')\n",
        "slots.py": "from dataclasses import dataclass\n\n@dataclass(slots=True)\nclass A:\n    x: int = 0\n",
        "runtime_union.py": "def f(x: int | None) -> list[int]:\n    return []\n",
        "matching.py": "def f(x):\n    match x:\n        case 1:\n            return 1\n",
    }
    for name, code in samples.items():
        (tmp_path / name).write_text(code)
        eval_flag = () if name != "runtime_union.py" else ("--eval-annotations",)
        result = _vermin(*eval_flag, files=[tmp_path / name])
        assert result.returncode != 0, (name, result.stdout)


def _python38() -> str | None:
    for candidate in ("python3.8", str(Path.home() / ".pyenv/versions/3.8.18/bin/python3.8")):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            probe = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                   text=True)
            if probe.returncode == 0 and probe.stdout.strip() == "(3, 8)":
                return found
    return None


def test_a_python_3_8_interpreter_compiles_every_device_file(tmp_path):
    python38 = _python38()
    if python38 is None:
        pytest.skip("no Python 3.8 interpreter here")
    code = ("import sys, py_compile\n"
            "for path in sys.argv[1:]:\n"
            "    py_compile.compile(path, cfile=path.replace('/', '_') + 'c', doraise=True)\n")
    result = subprocess.run([python38, "-c", code, *map(str, device_files())], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr


def test_device_commands_run_without_torch(cpu_fp32_bundle, sample_images, tmp_path):
    """A Jetson has no torch: ``build BUNDLE`` and ``detect`` must get by without it."""
    driver = ("import sys\n"
              "sys.modules['torch'] = None  # importing torch now fails, as on a device\n"
              "from edgeyolo.cli import main\n"
              "sys.argv = ['edgeyolo', *sys.argv[1:]]\n"
              "main()\n")

    def run(*args):
        return subprocess.run([sys.executable, "-c", driver, *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    compiled = run("build", cpu_fp32_bundle)
    assert compiled.returncode == 2 and "nothing to compile on this device" in compiled.stderr + compiled.stdout
    assert "torch" not in compiled.stderr
    detected = run("detect", cpu_fp32_bundle, sample_images[0], "--json")
    assert detected.returncode == 0, detected.stderr
