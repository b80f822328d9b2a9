"""ONNX → serialized TensorRT engine, on the device (needs TensorRT 8.5–11.x and a GPU).

Which network definition each TensorRT gets (``network_flags``, tested with stubs):

- before 10: explicit batch requested (``EXPLICIT_BATCH``; implicit batch was the default);
- 10.0–10.11: weakly typed, the FP16/INT8 builder flags choose the precisions;
- 10.12–10.x: strongly typed (``STRONGLY_TYPED``) for graphs typed in the ONNX itself, the
  flags still for TensorRT's implicit INT8 calibrators and bundles without a typed graph;
- 11: strongly typed only (the flag is accepted and ignored; the precision flags are gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import EdgeYoloError
from ...log import log
from .options import MIB, TrtOptions, parse_version

MIN_VERSION = (8, 5)  # the tensor-address API (execute_async_v3)
TESTED_MAJORS = (8, 9, 10, 11)


_LOGGER = None


def trt_logger(trt):
    """TensorRT wants one logger per process."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def check_version(trt) -> None:
    """TensorRT 8.5 (JetPack 5.1) or newer; a major release newer than 11 is tried, with a warning."""
    version = parse_version(trt.__version__)
    if version < MIN_VERSION:
        raise EdgeYoloError(f"TensorRT {trt.__version__} is too old; edgeyolo needs {'.'.join(map(str, MIN_VERSION))} "
                            "or newer (JetPack 5.1+)")
    if version[0] > TESTED_MAJORS[-1]:
        log.warning("TensorRT %s is newer than the releases edgeyolo knows (8.5 to 11.x); trying it as 11",
                    trt.__version__)


def network_flags(trt, typing: str) -> int:
    """``create_network``'s flags for this TensorRT and typing (see the module's docstring)."""
    version = parse_version(trt.__version__)
    flags = 0
    if version < (10,):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if typing == "strong":
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is None:
            raise EdgeYoloError(f"TensorRT {trt.__version__} cannot build strongly typed networks")
        flags |= 1 << int(strongly_typed)
    elif not hasattr(trt.BuilderFlag, "FP16"):
        raise EdgeYoloError(f"TensorRT {trt.__version__} builds strongly typed networks only")
    return flags


@dataclass
class BuildRequest:
    """What to compile and how."""

    onnx: bytes  # the graph TensorRT parses (already in TensorRT's Q/DQ encoding for explicit INT8)
    precision: str  # fp16 | fp32 | int8
    input_name: str
    input_shape: tuple  # (batch or "batch", 3, h, w)
    options: TrtOptions
    workspace: int
    typing: str = "weak"  # strong: precisions from the graph's types; weak: from builder flags
    calibrator: object = None  # implicit INT8 only
    float_tensors: tuple = ()  # implicit INT8: tensors kept out of INT8 (the head)
    timing_cache: object = None  # a FileCache
    facts: dict = field(default_factory=dict)  # filled in: what the build did


def build_engine(trt, request: BuildRequest) -> bytes:
    """Parse, configure and build; returns the serialized engine."""
    check_version(trt)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    _check_dla_cores(builder, request)
    network = builder.create_network(network_flags(trt, request.typing))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(request.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeYoloError(f"TensorRT cannot parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace)
    _set_precision(trt, config, network, request)
    _set_profile(builder, config, request)
    _set_dla(trt, builder, config, request)
    cache = _load_timing_cache(config, request)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeYoloError("TensorRT failed to build the engine (see its messages above)")
    request.facts["build_seconds"] = round(time.perf_counter() - start, 1)
    request.facts["workspace_mib"] = request.workspace // MIB
    if cache is not None:
        request.timing_cache.write(bytes(cache.serialize()))
    return bytes(serialized)


def _set_precision(trt, config, network, request: BuildRequest) -> None:
    request.facts["typing"] = request.typing
    if request.typing == "strong":
        # the graph's own types: FP16 where the typed graph says, INT8 between its Q/DQ pairs
        if request.precision == "int8":
            request.facts["int8"] = "explicit (Q/DQ ONNX, strongly typed)"
        return
    if request.precision == "fp32":
        return
    # FP16 in every INT8 build too: layers left unquantised (the head) then run in FP16, not FP32.
    config.set_flag(trt.BuilderFlag.FP16)
    if request.precision != "int8":
        return
    config.set_flag(trt.BuilderFlag.INT8)
    if request.calibrator is None:
        request.facts["int8"] = "explicit (Q/DQ ONNX)"
        return
    config.int8_calibrator = request.calibrator
    request.facts["int8"] = "implicit (TensorRT calibrator)"
    kept = keep_in_fp16(trt, network, request.float_tensors)
    if kept:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        request.facts["fp16_layers"] = kept


def keep_in_fp16(trt, network, tensors) -> int:
    """Pin the layers producing ``tensors`` (the head) to FP16, so the calibrator cannot quantise them."""
    wanted = set(tensors)
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        produced = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not any(t.name in wanted for t in produced):
            continue
        layer.precision = trt.float16
        for i, tensor in enumerate(produced):
            if tensor.name not in outputs:
                layer.set_output_type(i, trt.float16)
        pinned += 1
    return pinned


def _set_profile(builder, config, request: BuildRequest) -> None:
    batch, *chw = request.input_shape
    if isinstance(batch, int):
        return
    profile = builder.create_optimization_profile()
    chw = tuple(int(d) for d in chw)
    top = request.options.max_batch
    profile.set_shape(request.input_name, (1, *chw), (max(1, top // 2), *chw), (top, *chw))
    config.add_optimization_profile(profile)
    if request.calibrator is not None:
        calib = builder.create_optimization_profile()
        calib.set_shape(request.input_name, (1, *chw), (1, *chw), (1, *chw))
        config.set_calibration_profile(calib)


def _check_dla_cores(builder, request: BuildRequest) -> None:
    """DLA limits (precision, fixed batch) and this device's core count, before parsing anything."""
    from .options import check_dla

    core = request.options.dla_core
    check_dla(request.options, request.precision, not isinstance(request.input_shape[0], int))
    if core >= 0 and core >= builder.num_DLA_cores:
        raise EdgeYoloError(f"dla_core = {core}, but this device has {builder.num_DLA_cores} DLA core(s); "
                            "set dla_core = -1 for the GPU")


def _set_dla(trt, builder, config, request: BuildRequest) -> None:
    core = request.options.dla_core
    if core < 0:
        return
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    request.facts["dla_core"] = core


def _load_timing_cache(config, request: BuildRequest):
    if request.timing_cache is None:
        return None
    data = request.timing_cache.read() or b""
    try:
        cache = config.create_timing_cache(data)
        usable = cache is not None and config.set_timing_cache(cache, False)
    except Exception:  # noqa: BLE001 - a damaged cache file is only a slower build
        usable = False
    if not usable:
        if data:
            log.warning("the timing cache %s does not fit this TensorRT/GPU; starting a new one",
                        request.timing_cache.path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
    request.facts["timing_cache"] = str(request.timing_cache.path)
    return cache


def dla_cores(trt) -> int:
    return int(trt.Builder(trt_logger(trt)).num_DLA_cores)
