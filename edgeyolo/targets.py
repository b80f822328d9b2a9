"""Target profiles: TOML files in the top-level ``targets/`` folder (or any path a user gives)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgeYoloError
from .schema import Fields, int_list

PRECISIONS = ("fp32", "fp16", "int8")


def data_dir(name: str) -> Path:
    """A top-level data folder (``targets``, ``calibration``): in a checkout, or inside the installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise EdgeYoloError(f"the {name}/ folder is missing from this installation")


def targets_dir() -> Path:
    return data_dir("targets")


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    precision: str
    description: str = ""
    imgsz: tuple[int, int] = (640, 640)
    batch: int = 1
    dynamic_batch: bool = False
    dynamic_shape: bool = False
    head: str = "decoded"
    opset: int = 17
    calibration: dict = field(default_factory=dict)
    backend_options: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    path: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.precision == "int8"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "backend": self.backend, "precision": self.precision,
            "description": self.description, "imgsz": list(self.imgsz), "batch": self.batch,
            "dynamic_batch": self.dynamic_batch, "dynamic_shape": self.dynamic_shape, "head": self.head,
            "opset": self.opset, "calibration": self.calibration, "backend_options": self.backend_options,
            "runtime": self.runtime,
        }


def list_targets() -> list[Target]:
    return [read_target(p) for p in sorted(targets_dir().glob("*.toml"), key=lambda p: p.stem)]


def load_target(spec: str | Path) -> Target:
    """A target by name (``jetson-int8``) or by path to a ``.toml`` file."""
    spec = str(spec)
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise EdgeYoloError(f"{spec}: no such target file")
        return read_target(path)
    candidate = targets_dir() / f"{spec}.toml"
    if not candidate.is_file():
        known = ", ".join(p.stem for p in sorted(targets_dir().glob("*.toml")))
        raise EdgeYoloError(f"unknown target {spec!r} (known: {known}; or pass a path to a .toml file)")
    return read_target(candidate)


TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # used as a folder name: no "/", no ".."
HEADS = ("decoded", "sigmoid")
MIN_OPSET, MAX_OPSET = 11, 20  # YOLOv5 needs Resize (11); torch's TorchScript exporter stops at 20
MAX_SIDE, MAX_BATCH = 4096, 64
MAX_TARGET_BYTES = 1 << 20
TOP_LEVEL = ("name", "description", "backend", "precision", "imgsz", "batch", "dynamic_batch", "dynamic_shape",
             "head", "opset", "calibration", "runtime")
CALIBRATION_KEYS = ("seed", "size", "method", "percentile", "float_from_stride", "keep_float", "bias_correction",
                    "refit", "refit_ridge", "refit_weighting", "activations", "placement")
REFIT_WEIGHTINGS = ("none", "activation")  # the weight re-fit's objective (optimize/qat/refit.py)
# How Q/DQ activations are stored: "symmetric" (zero point 0 in int8 terms: the only form TensorRT
# takes) or "asymmetric" (uint8 with each tensor's own zero point: all 256 steps over [min, max])
ACTIVATION_SCHEMES = ("symmetric", "asymmetric")
# Where Q/DQ pairs go: "onnxruntime" also on each convolution's output and inside its SiLU (ONNX
# Runtime fuses an integer convolution only between a DQ and a Q); "tensorrt" only where TensorRT
# reads INT8 (convolution, add and concat inputs), so Conv+BN+SiLU runs as one fused INT8 layer
PLACEMENTS = ("onnxruntime", "tensorrt")
MAX_KEEP_FLOAT = 256  # layer names a target may leave in float
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")


def read_target(path: Path) -> Target:
    """A target file, checked against its schema (types, ranges, known keys) before anything uses it."""
    from .backends import BACKENDS

    where = str(path)
    if path.stat().st_size > MAX_TARGET_BYTES:
        raise EdgeYoloError(f"{where}: larger than {MAX_TARGET_BYTES >> 20} MB; not a target file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeYoloError(f"{where}: not valid TOML ({exc})") from None
    except RecursionError:
        raise EdgeYoloError(f"{where}: not valid TOML (nested too deeply)") from None
    top = Fields(data, where)
    backend = top.string("backend", required=True, choices=tuple(BACKENDS))
    top.only(TOP_LEVEL + (backend,))
    imgsz = top.raw("imgsz", 640)
    imgsz = [imgsz, imgsz] if not isinstance(imgsz, list) else imgsz
    int_list(imgsz, f"{where}: imgsz", length=2, lo=32, hi=MAX_SIDE)
    calibration = top.table("calibration")
    calibration.only(CALIBRATION_KEYS)
    calibration.integer("seed", default=0, lo=0)
    calibration.integer("size", default=1, lo=1, hi=100_000)
    calibration.string("method", default="mean-minmax", max_len=64)
    calibration.number("percentile", default=99.99, lo=0, hi=100)
    calibration.integer("float_from_stride", default=32, lo=0, hi=1024)
    calibration.boolean("bias_correction", default=False)
    calibration.boolean("refit", default=False)
    calibration.number("refit_ridge", default=1.0, lo=1e-6, hi=10)
    calibration.string("refit_weighting", default="none", choices=REFIT_WEIGHTINGS)
    calibration.string("placement", default="onnxruntime", choices=PLACEMENTS)
    if calibration.string("activations", default="symmetric", choices=ACTIVATION_SCHEMES) != "symmetric" \
            and backend == "tensorrt":
        calibration.fail("activations", "must be \"symmetric\" for TensorRT (it takes no zero points)")
    keep_float = calibration.raw("keep_float", [])
    if not isinstance(keep_float, list) or len(keep_float) > MAX_KEEP_FLOAT or not all(
            isinstance(name, str) and 0 < len(name) <= 200 for name in keep_float):
        calibration.fail("keep_float", f"must be a list of at most {MAX_KEEP_FLOAT} layer names (e.g. [\"model.8\"])")
    runtime = top.table("runtime")
    target = Target(
        name=top.string("name", default=path.stem, pattern=TARGET_NAME,
                        hint="it names output folders: letters, digits, '.', '_', '-', no '/'"),
        backend=backend,
        precision=top.string("precision", required=True, choices=PRECISIONS),
        description=top.string("description", default="", max_len=500),
        imgsz=(imgsz[0], imgsz[1]),
        batch=top.integer("batch", default=1, lo=1, hi=MAX_BATCH),
        dynamic_batch=top.boolean("dynamic_batch", default=False),
        dynamic_shape=top.boolean("dynamic_shape", default=False),
        head=top.string("head", default="decoded", choices=HEADS),
        opset=top.integer("opset", default=17, lo=MIN_OPSET, hi=MAX_OPSET),
        calibration=dict(calibration.data),
        backend_options=check_backend_options(top.table(backend), backend),
        runtime=dict(runtime.data),
        path=where,
    )
    return target


def check_backend_options(options: Fields, backend: str) -> dict:
    """The ``[backend]`` table: known options of the right type only, so ``detect`` never trips on one later."""
    if backend == "tensorrt":
        from .backends.trt.options import TrtOptions

        TrtOptions.from_options(options.data)
        return dict(options.data)
    if backend == "onnxruntime":
        options.only(("intra_op_threads", "graph_optimization", "uint8_input", "allow_spinning"))
        options.integer("intra_op_threads", default=0, lo=0, hi=1024)
        options.string("graph_optimization", default="all", choices=GRAPH_OPTIMIZATIONS)
        options.boolean("uint8_input", default=True)
        options.boolean("allow_spinning", default=False)
    elif backend == "openvino":
        from .backends.openvino import HINTS, PRECISIONS, PRESETS, RANGES

        options.only(("preset", "activations_range", "fast_bias_correction", "performance_hint", "threads",
                      "inference_precision", "uint8_input"))
        options.string("preset", default="mixed", choices=PRESETS)
        options.string("activations_range", default="histogram", choices=RANGES)
        options.boolean("fast_bias_correction", default=True)
        options.string("performance_hint", default="LATENCY", choices=HINTS)
        options.integer("threads", default=0, lo=0, hi=1024)
        options.string("inference_precision", default="f32", choices=PRECISIONS)
        options.boolean("uint8_input", default=True)
    elif backend == "tflite":
        options.only(("threads", "io_dtype"))
        options.integer("threads", default=0, lo=0, hi=1024)
        options.string("io_dtype", default="int8", choices=("int8", "float32"))
    return dict(options.data)
