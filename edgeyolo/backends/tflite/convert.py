"""ONNX → TFLite at build time: FP32, FP16, or full-integer INT8 calibrated on our own images.

onnx2tf and tensorflow run in a converter process (``worker``) inside a temporary work folder
that holds everything they read or write: a copy of the ONNX (onnx2tf rewrites its input), the
sample images onnx2tf would otherwise download for its own checks, and the calibration images.
A failed conversion becomes one line with the converter's reason; its full log is kept beside
the bundle that was not written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import cv2
import numpy as np

from ...errors import EdgeYoloError
from ...log import log
from .. import BuildResult
from .engine import describe_tensor, litert_version, open_interpreter
from .head import split_head_scales
from .worker import FAILURE_MARK

NAME = "tflite"
EXTRA = "tflite"
ENGINE_FILE = "model.tflite"
# import name → distribution name, for the converter's packages
CONVERTER_PACKAGES = {"onnx2tf": "onnx2tf", "tensorflow": "tensorflow", "tf_keras": "tf-keras",
                      "onnx_graphsurgeon": "onnx-graphsurgeon", "sng4onnx": "sng4onnx", "onnx": "onnx"}
IO_DTYPES = ("int8", "float32")
CALIBRATION_METHOD = "mean-min-max"  # per-activation mean of per-batch min/max (worker.set_mean_ranges)
# onnx2tf runs its own ONNX-vs-TF checks on 20 RGB images of this name in its working folder,
# and downloads them when the file is absent; we write it ourselves.
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SAMPLE_COUNT, SAMPLE_SIZE = 20, 128


def build(onnx_path: Path, target, out_dir: Path, calibration=None) -> BuildResult:
    check_target(target)
    require_converter()
    io_dtype = io_dtype_option(target)
    onnx_input, onnx_output = onnx_io_shapes(onnx_path)
    float_key = float_conversion_key(onnx_path) if target.precision in FLOAT_PRECISIONS else None
    reused = float_key is not None and reuse_float_conversion(float_key, target.precision, out_dir / ENGINE_FILE)
    if reused:
        seconds = 0.0
        log.info("reused this process's TFLite conversion of the same ONNX for %s", target.precision)
    else:
        seconds = convert(onnx_path, target, out_dir, calibration, io_dtype, onnx_input, float_key)
        log.info("converted to TFLite %s in %.1f s", target.precision, seconds)
    interpreter = open_interpreter(out_dir / ENGINE_FILE, threads=1)
    tensor_in, tensor_out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    check_shapes(onnx_input, onnx_output, tensor_in["shape"], tensor_out["shape"])
    return BuildResult(
        files={"engine": ENGINE_FILE},
        info={"version": litert_version(), "converter": f"onnx2tf {package_version('onnx2tf')}",
              "tensorflow": package_version("tensorflow"), "conversion_seconds": round(seconds, 1),
              **({"conversion_reused": True} if reused else {})},
        input={"layout": "NHWC", "shape": [int(d) for d in tensor_in["shape"]], "dtype": "float32",
               **describe_tensor(tensor_in)},
        output=describe_tensor(tensor_out),
    )


def convert(onnx_path: Path, target, out_dir: Path, calibration, io_dtype: str, onnx_input: list[int],
            float_key: str | None = None) -> float:
    """Run the converter process on a copy of ``onnx_path``; writes out_dir/ENGINE_FILE, returns its seconds.

    A float conversion keeps both float models under ``float_key`` (``float_conversion_key``)."""
    with tempfile.TemporaryDirectory(prefix=f"edgeyolo-tflite-{os.getpid()}-") as tmp:
        work = Path(tmp)
        copy_for_converter(onnx_path, work / "model.onnx", target.precision)
        np.save(work / SAMPLE_FILE, sample_images(calibration))
        job = {"onnx": "model.onnx", "precision": target.precision, "engine": ENGINE_FILE, "io_dtype": io_dtype,
               "batch": onnx_input[0], "calibration": None}
        if target.precision == "int8":
            job["calibration"] = write_calibration(calibration, work / "calibration.npy", onnx_input)
            calibration.method = CALIBRATION_METHOD
        elif float_key is not None:  # the other float model too, for a later build of this ONNX
            job["float_engines"] = {p: f"float-{p}.tflite" for p in FLOAT_PRECISIONS}
        (work / "job.json").write_text(json.dumps(job))
        seconds = run_converter(work, failure_log_path(out_dir))
        if float_key is not None:
            remember_float_conversion(float_key, {p: (work / f).read_bytes() for p, f in job["float_engines"].items()})
        shutil.move(str(work / ENGINE_FILE), out_dir / ENGINE_FILE)
    return seconds


# onnx2tf writes the FP32 and the FP16 model of one ONNX in a single run (tens of seconds): both are kept
# here, so arm-fp32 then arm-fp16 of one model in one process (``edgeyolo report``, a test session)
# converts once. Keyed by the ONNX's bytes and the converter's version; in memory only.
FLOAT_PRECISIONS = ("fp32", "fp16")
FLOAT_CACHE_BYTES = 256 << 20  # yolov5n: 7.6 + 3.8 MB per conversion; a model above this is kept alone
_RECENT_FLOATS: dict = {}  # {key: {precision: tflite bytes}}, oldest first
_FLOATS_LOCK = threading.Lock()


def float_conversion_key(onnx_path: Path) -> str:
    """What a float conversion depends on: the ONNX's bytes and the converter's versions."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    return f"{digest}:onnx2tf {package_version('onnx2tf')}:tensorflow {package_version('tensorflow')}"


def remember_float_conversion(key: str, models: dict[str, bytes]) -> None:
    with _FLOATS_LOCK:
        _RECENT_FLOATS.pop(key, None)
        _RECENT_FLOATS[key] = models
        while len(_RECENT_FLOATS) > 1 and sum(len(b) for m in _RECENT_FLOATS.values()
                                              for b in m.values()) > FLOAT_CACHE_BYTES:
            del _RECENT_FLOATS[next(iter(_RECENT_FLOATS))]


def reuse_float_conversion(key: str, precision: str, dest: Path) -> bool:
    """Write the remembered ``precision`` model under ``key`` to ``dest``; False when none is remembered."""
    with _FLOATS_LOCK:
        data = _RECENT_FLOATS.get(key, {}).get(precision)
    if data is None:
        return False
    dest.write_bytes(data)
    return True


def check_target(target) -> None:
    if target.dynamic_batch or target.dynamic_shape:
        raise EdgeYoloError(f"target {target.name}: TFLite engines here are static-shaped; "
                            "set dynamic_batch and dynamic_shape to false")
    if target.calibration.get("keep_float"):
        # onnx2tf's full-integer conversion has no per-op float fallback (no denylist of nodes)
        raise EdgeYoloError(f"target {target.name}: onnx2tf cannot leave single layers in float in a "
                            "full-integer model; drop keep_float / --keep-float for TFLite")
    if target.precision == "int8" and target.head != "sigmoid":
        log.warning("target %s: full-integer INT8 with the %r head puts pixel boxes and probabilities under one "
                    "int8 scale and loses box accuracy; head = \"sigmoid\" keeps it", target.name, target.head)


def io_dtype_option(target) -> str:
    """The full-integer engine's input/output type: int8 (NPUs, fastest) or float32 (quantise inside)."""
    io_dtype = str(target.backend_options.get("io_dtype", "int8"))
    if io_dtype not in IO_DTYPES:
        raise EdgeYoloError(f"target {target.name}: [tflite] io_dtype must be one of {', '.join(IO_DTYPES)}, "
                            f"not {io_dtype!r}")
    return io_dtype


def require_converter() -> None:
    """Fail with one line naming the extra when a converter package is missing (without importing tensorflow)."""
    for module, distribution in CONVERTER_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise EdgeYoloError(f"building TFLite engines needs the '{distribution}' package: "
                                f"pip install 'edgeyolo[{EXTRA}]'")


def package_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def onnx_io_shapes(onnx_path: Path) -> tuple[list[int], list[int]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def dims(value) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    return dims(graph.input[0]), dims(graph.output[0])


def copy_for_converter(onnx_path: Path, dest: Path, precision: str) -> None:
    """onnx2tf rewrites its input, so it gets a copy; an INT8 copy also gets its head scales split (see ``head``)."""
    if precision != "int8":
        shutil.copyfile(onnx_path, dest)
        return
    import onnx

    model = onnx.load(str(onnx_path))
    levels = split_head_scales(model)
    if levels:
        log.info("split the box and score channels of %d head convolutions for separate int8 scales", levels)
    onnx.save(model, str(dest))


def sample_images(calibration) -> np.ndarray:
    """The 20 small RGB 0..1 images onnx2tf checks its conversion with: ours, or a fixed pattern without any."""
    if calibration is not None and len(calibration):
        picks = [calibration.letterboxed[i % len(calibration)] for i in range(SAMPLE_COUNT)]
        small = [cv2.resize(img, (SAMPLE_SIZE, SAMPLE_SIZE), interpolation=cv2.INTER_AREA)[:, :, ::-1]
                 for img in picks]
        return np.stack(small).astype(np.float32) / np.float32(255.0)
    return np.random.default_rng(0).random((SAMPLE_COUNT, SAMPLE_SIZE, SAMPLE_SIZE, 3), dtype=np.float32)


def write_calibration(calibration, path: Path, onnx_input: list[int]) -> str:
    """The calibration batches (NHWC, as the runtime feeds them) stored losslessly as uint8 for the converter.

    Every input is k/255 for an integer k, so the uint8 copy restores it bit for bit (checked here).
    """
    if calibration is None:
        raise EdgeYoloError("INT8 TFLite builds need calibration images (--calib)")
    batch, _, height, width = onnx_input
    if tuple(calibration.letterbox.imgsz) != (height, width):
        raise EdgeYoloError(f"calibration images are letterboxed to {list(calibration.letterbox.imgsz)}, "
                            f"but the engine input is {[height, width]}")
    count = len(calibration) - len(calibration) % batch
    if count == 0:
        raise EdgeYoloError(f"{len(calibration)} calibration images cannot fill one batch of {batch}")
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, height, width, 3))
    for start, inputs in zip(range(0, count, batch), calibration.batches("NHWC", batch)):
        codes = np.rint(inputs * np.float32(255.0)).astype(np.uint8)
        if not np.array_equal(codes.astype(np.float32) / np.float32(255.0), inputs):
            raise EdgeYoloError("calibration inputs are not 8-bit images; cannot hand them to the TFLite converter")
        stored[start:start + batch] = codes
    stored.flush()
    del stored
    return path.name


def run_converter(work: Path, log_path: Path) -> float:
    """Run the worker in ``work``; on failure keep its log at ``log_path`` and raise with the reason."""
    converter_log = work / "converter.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root(), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "KERAS_HOME": str(work / "keras")}
    started = time.perf_counter()
    with open(converter_log, "wb") as out:
        status = subprocess.call([sys.executable, "-m", "edgeyolo.backends.tflite.worker", "job.json"],
                                 cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    seconds = time.perf_counter() - started
    if status == 0 and (work / ENGINE_FILE).is_file():
        return seconds
    text = converter_log.read_text(errors="replace")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(text)
    raise EdgeYoloError(f"TFLite conversion failed: {failure_reason(text, status)} (full converter log: {log_path})")


def package_root() -> str:
    """The folder holding the ``edgeyolo`` package, so the worker imports this very copy."""
    return str(Path(__file__).resolve().parents[3])


def failure_log_path(out_dir: Path) -> Path:
    """Beside the bundle being built: ``.NAME.building-xxxx`` (a ``BundleWriter`` folder) → ``NAME.tflite-convert.log``.
    """
    out_dir = Path(out_dir)
    match = re.match(r"^\.(.+)\.building-", out_dir.name)
    return out_dir.parent / f"{match.group(1) if match else out_dir.name}.tflite-convert.log"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# onnx2tf's ERROR lines around a traceback that say how to debug, not what went wrong
_ADVICE = ("The trace log is below", "input_onnx_file_path:", "onnx_op_name:", "Read this and deal with it",
           "Alternatively,", "If the input OP", "Also, for models")


def failure_reason(text: str, status: int) -> str:
    """One line: onnx2tf's first ERROR that names a cause, else the worker's exception; plus the ONNX node."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    errors = [line[len("ERROR:"):].strip() for line in lines if line.startswith("ERROR:")]
    causes = [e for e in errors if e and not e.startswith(_ADVICE)]
    marked = [line[len(FAILURE_MARK):].strip() for line in lines if line.startswith(FAILURE_MARK)]
    nodes = [e[len("onnx_op_name:"):].strip() for e in errors if e.startswith("onnx_op_name:")]
    reason = causes[0] if causes else marked[-1] if marked else next(
        (line for line in reversed(lines) if line), f"the converter exited with status {status}")
    if nodes:
        reason += f" (at ONNX node {nodes[0]})"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def check_shapes(onnx_input, onnx_output, tflite_input, tflite_output) -> None:
    """The converter must give NHWC of the same image and the head output unchanged."""
    batch, channels, height, width = onnx_input
    expected_in = [batch, height, width, channels]
    if [int(d) for d in tflite_input] != expected_in or [int(d) for d in tflite_output] != list(onnx_output):
        raise EdgeYoloError(f"the TFLite model has input {list(tflite_input)} and output {list(tflite_output)}; "
                            f"expected {expected_in} and {list(onnx_output)}")
