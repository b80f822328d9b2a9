"""A target's ``[tensorrt]`` table, checked once, and the decisions that follow from it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...errors import EdgeYoloError

INT8_MODES = ("auto", "explicit", "implicit")
MIB = 1 << 20
MIN_WORKSPACE = 64 * MIB
EXPLICIT_DEFAULT_FROM = (10, 1)  # TensorRT deprecated its implicit INT8 calibrators in 10.1
IMPLICIT_REMOVED_IN = (11, 0)
STRONGLY_TYPED_FROM = (10, 12)  # precision flags deprecated in favour of strongly typed networks
WEAK_TYPING_REMOVED_IN = (11, 0)  # BuilderFlag.FP16/INT8 and precision constraints are gone
DLA_PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class TrtOptions:
    workspace_fraction: float = 0.5  # of the GPU memory free when the build starts
    max_workspace_mib: int = 4096
    dla_core: int = -1  # Jetson DLA core (0, 1); layers it cannot run fall back to the GPU. -1: GPU only
    timing_cache: bool = True  # reuse kernel timings across builds on this device (faster rebuilds)
    int8_calibration: str = "auto"  # explicit (the Q/DQ ONNX) | implicit (TensorRT calibrator) | auto
    build_on_load: bool = True  # compile on first use when no engine for this device is cached
    max_batch: int = 8  # dynamic-batch bundles: the optimisation profile's largest batch

    @classmethod
    def from_options(cls, options: dict | None) -> "TrtOptions":
        options = dict(options or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise EdgeYoloError(f"unknown [tensorrt] option(s) {', '.join(unknown)} (known: {', '.join(known)})")
        try:
            value = cls(**{k: _coerce(cls.__dataclass_fields__[k].default, v) for k, v in options.items()})
        except (TypeError, ValueError) as exc:
            raise EdgeYoloError(f"malformed [tensorrt] options: {exc}") from None
        value.validate()
        return value

    def validate(self) -> None:
        if self.int8_calibration not in INT8_MODES:
            raise EdgeYoloError(f"[tensorrt] int8_calibration must be one of {', '.join(INT8_MODES)}, "
                                f"not {self.int8_calibration!r}")
        if not 0.0 < self.workspace_fraction <= 1.0:
            raise EdgeYoloError(f"[tensorrt] workspace_fraction must be in (0, 1], not {self.workspace_fraction}")
        if self.max_workspace_mib < MIN_WORKSPACE // MIB:
            raise EdgeYoloError(f"[tensorrt] max_workspace_mib must be at least {MIN_WORKSPACE // MIB}")
        if self.dla_core < -1:
            raise EdgeYoloError(f"[tensorrt] dla_core must be -1 (GPU only) or a DLA core index, not {self.dla_core}")
        if self.max_batch < 1:
            raise EdgeYoloError(f"[tensorrt] max_batch must be positive, not {self.max_batch}")


def _coerce(default, value):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    return type(default)(value)


def workspace_bytes(free_bytes: int, options: TrtOptions) -> int:
    """The builder's workspace: a share of the free GPU memory, capped, whole MiB, never below 64 MiB."""
    share = int(free_bytes * options.workspace_fraction)
    capped = min(share, options.max_workspace_mib * MIB)
    return max(MIN_WORKSPACE, capped // MIB * MIB)


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` → ``(10, 3, 0, 26)`` (non-numeric tails ignored)."""
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def int8_mode(options: TrtOptions, tensorrt_version: str, has_fp_onnx: bool) -> str:
    """``explicit`` (compile the Q/DQ ONNX) or ``implicit`` (calibrate the FP ONNX with TensorRT's calibrator).

    ``auto`` follows TensorRT: explicit from 10.1, implicit before (JetPack 5) when the bundle
    carries the FP ONNX. TensorRT 11 has no implicit calibrators left.
    """
    version = parse_version(tensorrt_version)
    mode = options.int8_calibration
    if mode == "auto":
        mode = "explicit" if version >= EXPLICIT_DEFAULT_FROM or not has_fp_onnx else "implicit"
    if mode == "implicit":
        if version >= IMPLICIT_REMOVED_IN:
            raise EdgeYoloError(f"TensorRT {tensorrt_version} has no implicit INT8 calibrators; "
                                "set int8_calibration = \"explicit\" (the Q/DQ ONNX)")
        if not has_fp_onnx:
            raise EdgeYoloError("implicit INT8 calibration needs the FP ONNX, which this bundle lacks; "
                                "rebuild it with int8_calibration = \"implicit\" or \"auto\"")
    return mode


def network_typing(tensorrt_version: str, mode: str, has_typed_graph: bool) -> str:
    """``strong`` (precision from the graph's own types) or ``weak`` (FP16/INT8 builder flags).

    From 10.12 TensorRT deprecates the precision flags in favour of strongly typed networks,
    and 11 removes them: there the bundle's FP16-typed graph is compiled as it is. FP32 needs
    no flag, and TensorRT's implicit calibrators exist only on weakly typed networks.
    """
    version = parse_version(tensorrt_version)
    if mode == "int8-implicit":
        return "weak"
    if mode == "fp32":
        return "strong" if version >= WEAK_TYPING_REMOVED_IN else "weak"
    if version >= STRONGLY_TYPED_FROM and has_typed_graph:
        return "strong"
    if version >= WEAK_TYPING_REMOVED_IN:
        raise EdgeYoloError(f"TensorRT {tensorrt_version} builds strongly typed networks only, and this bundle has "
                            "no FP16-typed graph (model-typed.onnx): rebuild the bundle with this edgeyolo")
    return "weak"


def check_dla(options: TrtOptions, precision: str, dynamic_batch: bool) -> None:
    """DLA runs FP16 and INT8 only, and only static shapes (min = opt = max): say so before any build."""
    if options.dla_core < 0:
        return
    if precision not in DLA_PRECISIONS:
        raise EdgeYoloError(f"dla_core = {options.dla_core}: the DLA runs {' and '.join(DLA_PRECISIONS)} only, "
                            f"not {precision}; use an fp16 or int8 target, or dla_core = -1 for the GPU")
    if dynamic_batch:
        raise EdgeYoloError(f"dla_core = {options.dla_core}: the DLA needs a fixed batch (min = opt = max), "
                            "not a dynamic one; set dynamic_batch = false, or dla_core = -1 for the GPU")
