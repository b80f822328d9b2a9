"""Learned INT8 ranges from a QAT checkpoint, handed to a build in place of calibration images.

A build passes a ``LearnedRanges`` where a ``CalibrationSet`` would go. The Q/DQ writers take it
instead of calibrating: ``quantize_onnx`` (cpu-int8, cuda-int8, jetson-int8: the graph QAT trained,
with its own ``activations``, whatever the target's) and the OpenVINO backend (intel-cpu-int8
converts the same Q/DQ ONNX; OpenVINO runs its QuantizeLinear/DequantizeLinear pairs as INT8).
No torch here: builds import this module.

The graph is written by the same ``write_qdq`` as post-training quantisation, with the placement
settings recorded at QAT time and the recorded ranges (so the same tensors are quantised), then
every activation scale is set to the learned float32 value bit for bit and checked: a checkpoint
whose scales do not fit the freshly exported graph is refused in one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...errors import EdgeYoloError
from ...targets import ACTIVATION_SCHEMES, PLACEMENTS

FORMAT = "edgeyolo-qat"
VERSION = 1
META_KEY = "qat"
ACT_HALF_RANGE = 127.5  # symmetric uint8 around 128: scale = 2 · max|range| / 255


class LearnedRanges:
    """What ``build`` needs from a QAT checkpoint's description: placement, ranges and learned scales."""

    learned = True

    def __init__(self, qat: dict, where: str):
        self.qat = check_qat_meta(qat, where)
        self.where = where
        self.method = "qat"

    # the CalibrationSet interface the build and the manifest use
    def __len__(self) -> int:
        return int(self.qat["calibration"].get("images", 0))

    def describe(self) -> dict:
        calib = self.qat["calibration"]
        return {"source": calib.get("source", ""), "method": "qat", "images": len(self),
                "quantization": "qat", "checkpoint": self.where,
                "teacher": self.qat["teacher"], "training": self.qat["training"],
                "settings": self.qat["settings"], "images_sha256": calib.get("images_sha256", "")}

    @property
    def keep_float(self) -> list[str]:
        return list(self.qat["settings"]["keep_float"])

    def settings(self):
        from ...quantize import QuantizeSettings

        s = self.qat["settings"]
        return QuantizeSettings(method=s["method"], percentile=float(s["percentile"]),
                                float_from_stride=int(s["float_from_stride"]), keep_float=tuple(s["keep_float"]),
                                placement=s.get("placement", "onnxruntime"),  # recorded since session 7
                                activations=s.get("activations", "symmetric"))

    @property
    def asymmetric(self) -> bool:
        return self.qat["settings"].get("activations", "symmetric") == "asymmetric"

    def qdq_model(self, src: Path):
        """The Q/DQ ONNX of ``src`` (the checkpoint's own float export) with the learned scales."""
        import onnx

        from ...backends import require
        from ...quantize import Ranges, kept_nodes, write_qdq

        q = require("onnxruntime.quantization", "onnxruntime")
        scales = self.qat["scales"]
        data = {}
        for tensor, (low, high) in self.qat["ranges"].items():
            learned = scales.get(f"{tensor}_scale")
            if learned is not None and not self.asymmetric:  # asymmetric: the calibrated ranges give the zero points
                low, high = -learned * ACT_HALF_RANGE, learned * ACT_HALF_RANGE
            data[tensor] = q.TensorData(lowest=np.float32(low), highest=np.float32(high))
        settings = self.settings()
        kept = kept_nodes(onnx.load(str(src)), settings.keep_float)
        qdq, removed = write_qdq(Path(src), Ranges(data=q.TensorsData(q.CalibrationMethod.MinMax, data), clipped=0),
                                 settings, extra_float=kept)
        set_activation_scales(qdq, scales, self.where)
        if self.asymmetric:
            check_zero_points(qdq, self.qat["zero_points"], self.where)
        for prop in qdq.metadata_props:
            if prop.key == "quantization":
                prop.value = f"qdq int8 per-channel weights, quantisation-aware trained ({len(scales)} learned scales)"
        onnx.checker.check_model(qdq)
        return qdq, removed, kept

    def write(self, src: Path, dst: Path) -> dict:
        """``quantize_onnx``'s job without calibration: write the Q/DQ ONNX to ``dst``, return manifest facts."""
        import onnx

        from ...backends import require
        from ...quantize import ACTIVATION_FACTS, split_head, summarize_qdq

        ort = require("onnxruntime", "onnxruntime")
        qdq, removed, kept = self.qdq_model(Path(src))
        tmp = Path(dst).with_name(Path(dst).name + ".tmp")
        onnx.save(qdq, str(tmp))
        tmp.replace(dst)
        summary = summarize_qdq(qdq)
        s = self.qat["settings"]
        return {
            "tool": f"onnxruntime.quantization {ort.__version__} (placement) + edgeyolo qat (scales)",
            "format": "QDQ",
            "method": "qat",
            "quantization": "qat",
            "placement_from": s["method"],
            "weights": "int8 symmetric per-channel",
            "activations": ACTIVATION_FACTS[self.settings().activations] + ", scales learned by QAT",
            "learned_scales": len(self.qat["scales"]),
            "images": len(self),
            "float_from_stride": s["float_from_stride"],
            "keep_float": list(s["keep_float"]),
            "kept_float_nodes": len(kept),
            "quantized_nodes": len(summary["quantized"]),
            "float_nodes": sorted(summary["float"]),
            "float_outputs_of": list(split_head(onnx.load(str(src))).convs),
            "removed_qdq_pairs": removed,
        }


def set_activation_scales(qdq, scales: dict, where: str) -> None:
    """Overwrite each activation scale initializer with its learned value; the two sets must be equal."""
    from onnx import numpy_helper

    activation = {n.input[1] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    missing, extra = sorted(activation - set(scales)), sorted(set(scales) - activation)
    if missing or extra:
        name = (missing or extra)[0]
        raise EdgeYoloError(f"{where}: the QAT scales do not fit this model's Q/DQ graph ({name!r} "
                            f"{'has no learned scale' if missing else 'is not in the graph'}); "
                            f"was the checkpoint edited, or built for another architecture?")
    for init in qdq.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(np.array(scales[init.name], dtype=np.float32), init.name))


def check_zero_points(qdq, zero_points: dict, where: str) -> None:
    """The graph's activation zero points must be the ones QAT trained with (they are fixed, not learned)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear":
            found = int(numpy_helper.to_array(inits[node.input[2]]))
            if zero_points.get(node.input[1]) != found:
                raise EdgeYoloError(f"{where}: the QAT zero points do not fit this model's Q/DQ graph "
                                    f"({node.input[1]!r}: {zero_points.get(node.input[1])!r} trained, {found} written)")


def qat_meta(description: dict) -> dict | None:
    """The ``qat`` part of a native checkpoint's description (``meta.qat``), or None for other checkpoints."""
    meta = (description or {}).get("meta") or {}
    return meta.get(META_KEY) if isinstance(meta, dict) else None


def check_qat_meta(qat, where: str) -> dict:
    """The QAT record, checked completely (a hand-edited or damaged one fails here, in one line)."""
    def fail(msg: str):
        raise EdgeYoloError(f"{where}: not a usable QAT checkpoint: {msg}")

    if not isinstance(qat, dict) or qat.get("format") != FORMAT:
        fail(f"meta.qat.format must be {FORMAT!r}")
    if qat.get("version") != VERSION:
        fail(f"version {qat.get('version')!r} is not supported (this edgeyolo reads {VERSION})")
    for key in ("settings", "ranges", "scales", "calibration", "teacher", "training", "export"):
        if not isinstance(qat.get(key), dict):
            fail(f"meta.qat.{key} must be a JSON object")
    s = qat["settings"]
    if not (isinstance(s.get("method"), str) and _number(s.get("percentile"))
            and isinstance(s.get("float_from_stride"), int) and s["float_from_stride"] >= 0
            and isinstance(s.get("keep_float"), list) and all(isinstance(n, str) and n for n in s["keep_float"])
            and s.get("placement", "onnxruntime") in PLACEMENTS
            and s.get("activations", "symmetric") in ACTIVATION_SCHEMES):
        fail("meta.qat.settings must hold method, percentile, float_from_stride and keep_float "
             f"(and a placement of {', '.join(PLACEMENTS)}, activations of {', '.join(ACTIVATION_SCHEMES)})")
    if s.get("activations") == "asymmetric" and not (
            isinstance(qat.get("zero_points"), dict) and qat["zero_points"].keys() == qat["scales"].keys()
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                    for v in qat["zero_points"].values())):
        fail("meta.qat.zero_points must give every scale an integer zero point in [0, 255]")
    if not qat["scales"] or not all(isinstance(k, str) and _number(v) and v > 0 for k, v in qat["scales"].items()):
        fail("meta.qat.scales must map scale names to positive numbers")
    if not all(isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)
               for k, v in qat["ranges"].items()):
        fail("meta.qat.ranges must map tensor names to [low, high]")
    return qat


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def learned_ranges_for(weights) -> LearnedRanges | None:
    """The learned ranges of a QAT checkpoint, None for any other weights (read from the header only)."""
    from ...model.native import METADATA_KEY, is_native_checkpoint
    from ...model.safetensors_file import read_header, read_metadata_json
    from ...model.weights import resolve_weights

    path = resolve_weights(weights)
    if not is_native_checkpoint(path):
        return None
    description = read_metadata_json(path, read_header(path), METADATA_KEY, "model description")
    qat = qat_meta(description if isinstance(description, dict) else {})
    return None if qat is None else LearnedRanges(qat, str(path))


def reference_weights(learned: LearnedRanges, weights):
    """What the accuracy gate compares a QAT build with: the FP32 model it was trained from, where it is here."""
    from ...bundle import sha256_file
    from ...log import log

    teacher = Path(learned.qat["teacher"].get("weights", ""))
    if teacher.is_file() and sha256_file(teacher) == learned.qat["teacher"].get("sha256"):
        return teacher
    log.warning("the FP32 model this QAT checkpoint was trained from (%s) is not here; the gate compares "
                "with the checkpoint's own float weights", teacher)
    return weights
