"""TensorRT: NVIDIA GPUs and Jetson. Engines are compiled on the device, from a portable bundle.

A TensorRT engine is tied to one TensorRT version and one GPU, so the bundle carries the
graph to compile rather than (only) an engine:

- ``int8``: the explicit-INT8 Q/DQ ONNX (``edgeyolo.quantize``), the very graph ``cpu-int8``
  runs, so ``edgeyolo eval BUNDLE --backend onnxruntime`` measures its accuracy on any CPU;
  plus the FP ONNX for TensorRT's implicit calibrators (TensorRT < 10.1);
- ``fp16`` / ``fp32``: the FP ONNX;
- for ``int8`` and ``fp16`` also that graph typed in FP16 (``model-typed.onnx``), which
  TensorRT >= 10.12 compiles as a strongly typed network (11 has no other kind).

``build`` on a machine with TensorRT and a GPU compiles the engine into the bundle at once;
elsewhere it writes the portable bundle. ``compile_bundle`` (``edgeyolo build BUNDLE``) or
the first ``Engine`` on the device compiles it and caches it in ``<bundle>/engines/`` (or the
user cache when the bundle is read-only), keyed by TensorRT version, GPU and compute capability.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import sha256_file
from ..errors import EdgeYoloError
from ..log import log
from . import BuildResult
from .trt.cache import (
    ENGINES_DIR,
    EngineCache,
    EngineKey,
    calibration_cache,
    calibration_cache_key,
    resolve,
)
from .trt.cache import timing_cache as timing_cache_for
from .trt.options import TrtOptions, check_dla, int8_mode, network_typing

NAME = "tensorrt"
ONNX_FILE = "model.onnx"
FP_ONNX_FILE = "model-fp.onnx"
PRECISIONS = ("fp16", "fp32", "int8")


# --------------------------------------------------------------------------- build (anywhere)
def build(onnx_path: Path, target, out_dir: Path, calibration=None) -> BuildResult:
    """Write the portable sources; compile the engine too where TensorRT and a GPU are present."""
    options = TrtOptions.from_options(target.backend_options)
    if target.precision not in PRECISIONS:
        raise EdgeYoloError(f"tensorrt targets are {', '.join(PRECISIONS)}, not {target.precision}")
    if target.dynamic_shape:
        raise EdgeYoloError("tensorrt engines take a fixed input size (dynamic_batch is supported, dynamic_shape not)")
    check_dla(options, target.precision, target.dynamic_batch)
    files, info = write_sources(Path(onnx_path), target, Path(out_dir), calibration, options)
    trt = tensorrt_here()
    if trt is None:
        log.info("no TensorRT or no GPU here: wrote a portable bundle; compile it on the device with "
                 "'edgeyolo build BUNDLE'")
        return BuildResult(files=files, info={"version": None, "portable": True, **info})
    job = CompileJob(onnx=Path(out_dir) / files["onnx"],
                     fp_onnx=Path(out_dir) / files["onnx_fp"] if "onnx_fp" in files else None,
                     typed_onnx=Path(out_dir) / files["onnx_typed"] if "onnx_typed" in files else None,
                     precision=target.precision, options=options,
                     calibration_facts=calibration.describe() if calibration is not None else None,
                     calibration=calibration)
    engine = compile_engine(trt, job, EngineCache([Path(out_dir) / ENGINES_DIR]), allow_build=True)
    files["engine"] = str(engine.relative_to(out_dir))
    return BuildResult(files=files, info={"version": trt.__version__, "portable": False, **info})


def write_sources(onnx_path: Path, target, out_dir: Path, calibration, options: TrtOptions) -> tuple[dict, dict]:
    """The graphs the device compiles: the Q/DQ ONNX (+ FP ONNX for implicit INT8), or the FP ONNX; and typed in FP16."""
    if target.precision != "int8":
        shutil.copyfile(onnx_path, out_dir / ONNX_FILE)
        files = {"onnx": ONNX_FILE}
        if target.precision == "fp16":
            try:
                files["onnx_typed"] = write_typed_graph(out_dir / ONNX_FILE, out_dir)
            except EdgeYoloError as exc:
                log.warning("%s; without it TensorRT 11 cannot compile this bundle", exc)
        return files, {}
    from ..quantize import QuantizeSettings, quantize_onnx

    if calibration is None:
        raise EdgeYoloError(f"target {target.name} is INT8 and needs calibration images (--calib)")
    facts = quantize_onnx(onnx_path, out_dir / ONNX_FILE, calibration, QuantizeSettings.from_target(target))
    files = {"onnx": ONNX_FILE}
    if options.int8_calibration != "explicit":
        shutil.copyfile(onnx_path, out_dir / FP_ONNX_FILE)
        files["onnx_fp"] = FP_ONNX_FILE
    files["onnx_typed"] = write_typed_graph(out_dir / ONNX_FILE, out_dir)
    return files, {"quantization": facts}


def write_typed_graph(source: Path, out_dir: Path) -> str:
    """``source`` with its float parts in FP16, for TensorRT's strongly typed networks (>= 10.12)."""
    import onnx

    from .trt.typed import TYPED_FILE, fp16_typed

    onnx.save(fp16_typed(onnx.load(str(source))), str(out_dir / TYPED_FILE))
    return TYPED_FILE


def import_tensorrt():
    """TensorRT's Python package, or one line saying where it comes from (it is not on PyPI's default index)."""
    try:
        import tensorrt
    except ImportError:
        raise EdgeYoloError(
            "TensorRT is not installed here: it comes with JetPack (python3-libnvinfer) or from NVIDIA's index "
            "(pip install tensorrt --extra-index-url https://pypi.nvidia.com), with pip install 'edgeyolo[tensorrt]'; "
            "to measure an INT8 bundle's accuracy without it: edgeyolo eval BUNDLE --backend onnxruntime"
        ) from None
    return tensorrt


def tensorrt_here():
    """The ``tensorrt`` module where it and a GPU are usable; None elsewhere."""
    from .trt.device import gpu_count

    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if gpu_count() > 0 else None


# --------------------------------------------------------------------------- compile (on the device)
@dataclass
class CompileJob:
    """What to compile: the bundle's graphs, precision and options (and calibration images, if at hand)."""

    onnx: Path
    fp_onnx: Path | None
    precision: str
    options: TrtOptions
    calibration_facts: dict | None = None
    calibration: object = None  # a CalibrationSet, or a folder/list/named set to load one from
    name: str = "BUNDLE"
    typed_onnx: Path | None = None  # the graph typed in FP16, for strongly typed networks

    @classmethod
    def from_bundle(cls, bundle, calibration=None) -> "CompileJob":
        files = bundle.manifest["backend"]["files"]
        return cls(onnx=bundle.file("onnx"),
                   fp_onnx=bundle.file("onnx_fp") if "onnx_fp" in files else None,
                   typed_onnx=bundle.file("onnx_typed") if "onnx_typed" in files else None,
                   precision=bundle.target["precision"],
                   options=TrtOptions.from_options(bundle.manifest["backend"].get("options")),
                   calibration_facts=bundle.manifest.get("calibration"), calibration=calibration,
                   name=str(bundle.path))


def compile_bundle(bundle, calibration=None) -> Path:
    """``edgeyolo build BUNDLE`` on the device: the engine for this TensorRT and GPU, compiled once and cached."""
    from .trt.device import require_gpu

    trt = import_tensorrt()
    require_gpu()
    job = CompileJob.from_bundle(bundle, calibration)
    return compile_engine(trt, job, EngineCache.for_bundle(bundle.path), allow_build=True)


def compile_engine(trt, job: CompileJob, cache: EngineCache, allow_build: bool) -> Path:
    """The cached engine for this device, compiling it first when needed (and allowed)."""
    import onnx

    from .trt.builder import BuildRequest, build_engine, check_version
    from .trt.device import gpu_facts, memory_info
    from .trt.encoding import to_tensorrt_encoding
    from .trt.options import workspace_bytes

    check_version(trt)
    gpu = gpu_facts()
    plan = plan_compile(job, trt.__version__, cache)
    model = onnx.load(str(plan.source))
    key = EngineKey(tensorrt=trt.__version__, gpu=gpu.name, compute_capability=gpu.compute_capability,
                    dla_core=job.options.dla_core, mode=plan.mode, source_sha256=plan.source_sha256,
                    settings=plan.settings_digest())
    cached = resolve(cache, key, allow_build, job.name)
    if cached is not None:
        return cached
    if plan.mode == "int8-explicit":
        to_tensorrt_encoding(model)  # a no-op on the typed graph, written in this encoding
    request = BuildRequest(onnx=model.SerializeToString(), precision=job.precision, input_name=plan.input_name,
                           input_shape=plan.input_shape, options=job.options, typing=plan.typing,
                           workspace=workspace_bytes(memory_info()[0], job.options),
                           timing_cache=timing_cache_for(trt.__version__, gpu.name, gpu.compute_capability)
                           if job.options.timing_cache else None)
    calibrator = None
    if plan.mode == "int8-implicit":
        calibrator = implicit_calibrator(trt, job, plan, cache)
        request.calibrator = calibrator
        request.float_tensors = head_tensors(model)
    try:
        engine = build_engine(trt, request)
    except EdgeYoloError:
        if calibrator is not None:
            calibrator.feed.raise_if_failed()  # a failed calibration is the cause worth reporting
        raise
    finally:
        if calibrator is not None:
            calibrator.close()
    if calibrator is not None:
        calibrator.feed.raise_if_failed()  # TensorRT swallows get_batch's exceptions: surface them here
    path = cache.store(key, engine, meta={"source": plan.source.name, "build": request.facts})
    log.info("compiled %s in %.0f s", path, request.facts.get("build_seconds", 0))
    return path


@dataclass
class CompilePlan:
    """The decisions before a build: which graph, which INT8 mode, which calibration cache."""

    mode: str  # fp16 | fp32 | int8-explicit | int8-implicit
    typing: str  # strong (the graph's own types) | weak (precision builder flags)
    source: Path
    source_sha256: str
    input_name: str
    input_shape: tuple
    max_batch: int | None
    calibration_key: str | None = None
    algorithm: str | None = None

    def settings_digest(self) -> str:
        settings = {"input_shape": [str(d) for d in self.input_shape], "max_batch": self.max_batch,
                    "calibration": self.calibration_key, "typing": self.typing}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_compile(job: CompileJob, tensorrt_version: str, cache: EngineCache) -> CompilePlan:
    """Pick the graph, INT8 mode and typing for this TensorRT; ``auto`` falls back to explicit when implicit has no data.

    DLA limits are checked here too, for bundles whose options were edited after the build.
    """
    from .trt.calibrator import algorithm_for

    mode = job.precision
    if mode == "int8":
        mode = "int8-" + int8_mode(job.options, tensorrt_version, job.fp_onnx is not None)
    plan = _plan(job, mode, tensorrt_version, algorithm_for)
    if plan.mode == "int8-implicit" and job.options.int8_calibration == "auto" and not _implicit_data(job, plan, cache):
        log.warning("TensorRT %s: no calibration images or calibration cache here for implicit INT8; "
                    "compiling the explicit Q/DQ ONNX instead", tensorrt_version)
        plan = _plan(job, "int8-explicit", tensorrt_version, algorithm_for)
    check_dla(job.options, job.precision, plan.max_batch is not None)
    return plan


def _plan(job: CompileJob, mode: str, tensorrt_version: str, algorithm_for) -> CompilePlan:
    import onnx

    typing = network_typing(tensorrt_version, mode, job.typed_onnx is not None)
    if mode == "int8-implicit":
        source = job.fp_onnx
    elif typing == "strong" and mode != "fp32":
        source = job.typed_onnx
    else:
        source = job.onnx
    input_name, input_shape = graph_input(onnx.load(str(source), load_external_data=False))
    digest = sha256_file(source)
    plan = CompilePlan(mode=mode, typing=typing, source=source, source_sha256=digest, input_name=input_name, input_shape=input_shape,
                       max_batch=None if isinstance(input_shape[0], int) else job.options.max_batch)
    if mode == "int8-implicit":
        plan.algorithm = algorithm_for((job.calibration_facts or {}).get("method") or "entropy")
        plan.calibration_key = calibration_cache_key(job.calibration_facts or {}, input_shape, digest,
                                                     plan.algorithm, tensorrt_version)
    return plan


def _implicit_data(job: CompileJob, plan: CompilePlan, cache: EngineCache) -> bool:
    source = (job.calibration_facts or {}).get("source")
    return (job.calibration is not None or _calibration_table(cache, plan.calibration_key).read() is not None
            or bool(source and Path(source).exists()))


def _calibration_table(cache: EngineCache, key: str):
    """The calibration cache for ``key``: an existing one in any cache folder, else one in the first writable."""
    tables = [calibration_cache(folder, key) for folder in cache.folders]
    return next((t for t in tables if t.read() is not None), calibration_cache(cache.writable_folder(), key))


def graph_input(model) -> tuple[str, tuple]:
    """The ONNX input's name and shape (symbolic dimensions as their names)."""
    tensor = model.graph.input[0]
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in tensor.type.tensor_type.shape.dim)
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise EdgeYoloError(f"the ONNX input {tensor.name} must be N x 3 x H x W with a fixed size, not {dims}")
    return tensor.name, dims


def head_tensors(model) -> tuple[str, ...]:
    """The head's tensors (detection convolutions' outputs and the decode after them): kept in FP16."""
    from ..quantize import split_head

    head = split_head(model)
    decode = set(head.decode)
    outputs = [o for node in model.graph.node if node.name in decode for o in node.output]
    return tuple(head.float_tensors) + tuple(outputs)


def implicit_calibrator(trt, job: CompileJob, plan: CompilePlan, cache: EngineCache):
    """TensorRT's calibrator over our calibration images, with a calibration cache keyed by them.

    The images are loaded only when TensorRT asks for batches: never when it accepts the
    cached table, and also when it rejects one (it then calibrates afresh).
    """
    from .trt.calibrator import CalibrationBatches, CalibrationFeed, make_calibrator

    table = _calibration_table(cache, plan.calibration_key)
    batch = plan.input_shape[0] if isinstance(plan.input_shape[0], int) else 1
    shape = (batch, *plan.input_shape[1:])
    # no table: the images must be here, so load them (or say they are missing) before the build starts
    calibration = load_calibration_for(job, shape) if table.read() is None else None

    def load():
        return CalibrationBatches(load_calibration_for(job, shape) if calibration is None else calibration, shape)

    log.info("implicit INT8: TensorRT %s calibrator, calibration cache %s", plan.algorithm, table.path)
    return make_calibrator(trt, plan.algorithm, CalibrationFeed(shape, load, table))


def load_calibration_for(job: CompileJob, shape):
    """The calibration set: the one given, or the images the bundle was calibrated on if they are on this device."""
    from ..calibration import CalibrationSet, load_calibration
    from ..runtime.preprocess import LetterboxSettings

    facts = job.calibration_facts or {}
    if isinstance(job.calibration, CalibrationSet):
        return job.calibration
    spec = job.calibration or facts.get("source")
    if not spec or (job.calibration is None and not Path(spec).exists()):
        raise EdgeYoloError(
            "TensorRT's implicit INT8 calibration needs the calibration images on this device "
            f"(the bundle was calibrated on {facts.get('source')!r}): copy them here and pass them with "
            "--calib, or set int8_calibration = \"explicit\" to compile the Q/DQ ONNX")
    letterbox = (LetterboxSettings.from_dict(facts["preprocess"]) if facts.get("preprocess")
                 else LetterboxSettings(imgsz=tuple(shape[2:])))
    calibration = load_calibration(spec, letterbox, size=facts.get("images"), seed=int(facts.get("seed", 0)))
    calibration.method = facts.get("method", "")
    expected = facts.get("images_sha256")
    if expected and calibration.describe()["images_sha256"] != expected:
        log.warning("the calibration images in %s differ from those the bundle was calibrated on", spec)
    return calibration


# --------------------------------------------------------------------------- run
class Engine:
    """The bundle's engine for this GPU (compiled on first use when allowed), on its own CUDA stream."""

    def __init__(self, bundle, threads: int | None = None, **_):
        from .trt.device import gpu_facts, require_gpu
        from .trt.runner import TrtRunner

        trt = import_tensorrt()
        require_gpu()
        options = TrtOptions.from_options(bundle.manifest["backend"].get("options"))
        job = CompileJob.from_bundle(bundle)
        self.engine_path = compile_engine(trt, job, EngineCache.for_bundle(bundle.path),
                                          allow_build=options.build_on_load)
        self.runner = TrtRunner(trt, self.engine_path.read_bytes(), dla_core=options.dla_core)
        gpu = gpu_facts()
        self.gpu = gpu
        self.info = {"backend": NAME, "version": trt.__version__, "threads": None, "gpu": gpu.name,
                     "compute_capability": gpu.compute_capability, "engine": self.engine_path.name}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.infer(batch)

    def memory_stats(self) -> dict:
        """GPU memory (whole device and this engine) and, on a Jetson, tegrastats-style figures."""
        from .trt.device import jetson_stats, memory_info

        free, total = memory_info()
        return {"gpu": self.gpu.name, "gpu_memory_total_mb": round(total / 2**20),
                "gpu_memory_used_mb": round((total - free) / 2**20), **self.runner.memory(), **jetson_stats()}

    def close(self) -> None:
        self.runner.close()
