"""Which layers INT8 hurts most: leave one block in float at a time and see how close the output comes to FP32.

The experiment is "all INT8 except this block" (not "all float except this block"): errors
compound through the network, so a block's cost is only visible with the rest quantised as
deployed, and the question a build asks (which blocks to keep in float) is answered directly:
the blocks whose float version recovers the most of the INT8 error.

The measure is a proxy, not mAP: the squared difference between the INT8 and FP32 sigmoid-head
outputs (boxes, objectness, classes), weighted by the FP32 objectness, so that cells holding
objects count and the thousands of empty background cells do not. It needs no labels, runs on
a few dozen images, and ``benchmarks/bench_int8.py`` checks that it ranks recipes as mAP does.

For the Q/DQ graph (``cpu-int8``, ``cuda-int8``, ``jetson-int8``) the activation ranges are
calibrated once and every variant is only a new Q/DQ placement: a block costs a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgeYoloError
from .quantize import (
    QuantizeSettings,
    apply_bias_shifts,
    bias_shifts,
    calibrate_ranges,
    kept_nodes,
    layers,
    split_head,
    write_qdq,
)

QDQ_BACKENDS = ("onnxruntime", "tensorrt")
OBJECTNESS = 4  # channel of the sigmoid head's objectness


@dataclass(frozen=True)
class LayerScore:
    layer: str
    error: float  # proxy error with this block in float and the rest INT8
    recovered: float  # share of the all-INT8 error that keeping this block float removes (0..1)
    nodes: int
    macs_share: float = 0.0  # share of the model's convolution MACs in this block: what moves off INT8 kernels


@dataclass
class SensitivityReport:
    baseline_error: float  # every block INT8 (head decode aside)
    scores: list[LayerScore]  # most sensitive first
    images: int
    settings: dict

    def ranked(self) -> list[str]:
        return [s.layer for s in self.scores]

    def to_dict(self) -> dict:
        return {"proxy": "objectness-weighted MSE of the sigmoid head vs FP32", "images": self.images,
                "settings": self.settings, "baseline_error": self.baseline_error,
                "layers": [dataclasses.asdict(s) for s in self.scores]}


def weighted_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Objectness-weighted mean squared difference of two sigmoid-head outputs (batch, rows, 5 + classes)."""
    weight = reference[..., OBJECTNESS]
    per_row = np.mean((candidate.astype(np.float64) - reference) ** 2, axis=-1)
    return float(np.sum(weight * per_row) / max(float(np.sum(weight)), 1e-12))


class OnnxRunner:
    """Runs an ONNX model (a path or a ``ModelProto``) over the same inputs, one image at a time."""

    def __init__(self, inputs: list[np.ndarray], threads: int = 0):
        self.inputs = inputs
        self.threads = threads

    def __call__(self, model) -> list[np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        source = model if isinstance(model, (str, Path)) else model.SerializeToString()
        session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                       providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        feed = as_letterbox if spec.type == "tensor(uint8)" else (lambda x: x)
        return [session.run(None, {spec.name: feed(x)})[0] for x in self.inputs]


def as_letterbox(x: np.ndarray) -> np.ndarray:
    """A network input (RGB float NCHW, k/255) as the BGR uint8 NHWC letterbox it was made from, exactly:
    for a bundle's ONNX that takes the letterbox itself (``backends.image_input``)."""
    return np.ascontiguousarray(np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)[..., ::-1])


def proxy_error(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    return float(np.mean([weighted_error(r, o) for r, o in zip(reference, outputs)]))


def qdq_sensitivity(onnx_path: Path, calibration, inputs: list[np.ndarray], settings: QuantizeSettings,
                    candidates: list[str] | None = None, progress: Callable[[int], None] | None = None,
                    threads: int = 0) -> SensitivityReport:
    """Rank ``candidates`` (default: every block but the head's decode) on the Q/DQ graph of ``onnx_path``.

    ``onnx_path`` must have the sigmoid head; ``inputs`` are letterboxed network inputs (1, 3, H, W).
    The settings' own ``keep_float`` is ignored: every variant keeps exactly one block float.
    """
    import onnx

    if not inputs:
        raise EdgeYoloError("sensitivity needs at least one image to measure on")
    model = onnx.load(str(onnx_path))
    run = OnnxRunner(inputs, threads)
    reference = run(onnx_path)
    if reference[0].ndim != 3 or float(np.max(reference[0])) > 1.0 or float(np.min(reference[0])) < 0.0:
        raise EdgeYoloError("sensitivity needs the sigmoid head (every output in 0..1): use an INT8 target")
    settings = dataclasses.replace(settings, keep_float=())
    ranges = calibrate_ranges(onnx_path, calibration, settings)
    decode = set(split_head(model).decode)
    candidates = candidates or [name for name in layers(model)
                                if not set(kept_nodes(model, [name])) <= decode]
    with tempfile.TemporaryDirectory(prefix="edgeyolo-sensitivity-") as work:
        source = onnx_path
        all_int8 = write_qdq(onnx_path, ranges, settings)[0]
        if settings.refit:  # weights re-fit once for the all-INT8 graph; each variant is written from them
            from .optimize.qat.refit import refit_onnx

            source = Path(work) / "refit.onnx"
            refit_onnx(onnx_path, all_int8, calibration, source, ridge=settings.refit_ridge,
                       weighting=settings.refit_weighting)
            all_int8 = write_qdq(source, ranges, settings)[0]
        # bias correction (if the settings ask for it) is per layer, so measured once it holds for every variant
        shifts = bias_shifts(all_int8, onnx_path, calibration) if settings.bias_correction and not settings.refit \
            else {}
        scores, baseline = _score_variants(source, ranges, settings, all_int8, shifts, reference, run, model,
                                           candidates, progress)
    scores.sort(key=lambda s: s.error)
    return SensitivityReport(baseline_error=baseline, scores=scores, images=len(inputs),
                             settings={"method": settings.describe(), "float_from_stride": settings.float_from_stride,
                                       "calibration_images": len(calibration)})


def _score_variants(source, ranges, settings, all_int8, shifts, reference, run, model, candidates, progress):
    """The proxy error of the all-INT8 graph and of each variant that keeps one candidate block float."""
    macs = conv_macs(model)
    total_macs = max(sum(macs.values()), 1)

    def variant(extra_float=()):
        qdq = write_qdq(source, ranges, settings, extra_float=extra_float)[0] if extra_float else all_int8
        apply_bias_shifts(qdq, shifts)
        return run(qdq)

    baseline = proxy_error(reference, variant())
    if progress:
        progress(1)
    scores = []
    for name in candidates:
        nodes = kept_nodes(model, [name])
        error = proxy_error(reference, variant(nodes))
        scores.append(LayerScore(layer=name, error=error, nodes=len(nodes),
                                 recovered=(baseline - error) / baseline if baseline > 0 else 0.0,
                                 macs_share=sum(macs.get(n, 0) for n in nodes) / total_macs))
        if progress:
            progress(1)
    return scores, baseline


def conv_macs(model) -> dict[str, int]:
    """Multiply-accumulates of each convolution node (static shapes): the cost a kept layer moves to float."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    weights = {i.name: i.dims for i in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights or node.output[0] not in dims:
            continue
        out_c, in_c, kh, kw = weights[node.input[1]]
        shape = dims[node.output[0]]
        macs[node.name] = int(np.prod(shape[2:])) * out_c * in_c * kh * kw
    return macs


def most_sensitive(report: SensitivityReport, count: int) -> list[str]:
    """The ``count`` blocks whose float version recovers the most INT8 error (only those that recover any)."""
    return [s.layer for s in report.scores[:count] if s.recovered > 0]


# --------------------------------------------------------------------------- output files
def write_report(report: SensitivityReport, out_dir: Path) -> list[Path]:
    """``sensitivity.json``, ``sensitivity.md`` (the ranked table) and ``sensitivity.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sensitivity.json", out_dir / "sensitivity.md", out_dir / "sensitivity.png"]
    paths[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths[1].write_text(markdown_table(report))
    plot(report, paths[2])
    return paths


def markdown_table(report: SensitivityReport) -> str:
    lines = [f"# INT8 sensitivity ({report.settings['method']}, {report.images} images)", "",
             f"All blocks INT8: proxy error {report.baseline_error:.3e}. Each row: that block in float, the rest INT8.",
             "", "| rank | layer | nodes | error | recovered | share of MACs |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {i} | {s.layer} | {s.nodes} | {s.error:.3e} | {s.recovered * 100:.1f} % | {s.macs_share * 100:.1f} % |"
              for i, s in enumerate(report.scores, 1)]
    return "\n".join(lines) + "\n"


def plot(report: SensitivityReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = report.scores
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(scores) + 1.2))
    ax.barh([s.layer for s in scores][::-1], [s.recovered * 100 for s in scores][::-1], color="tab:blue")
    ax.set_xlabel("INT8 error recovered by keeping the layer in float (%)")
    ax.set_title(f"INT8 sensitivity, {report.settings['method']} ({report.images} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- from weights
def letterboxed_inputs(spec, weights, target, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` images drawn (seeded) from a folder, list or dataset, as the target's network inputs."""
    import logging

    from .build import prepare_calibration
    from .log import log

    level = log.level
    log.setLevel(logging.ERROR)  # the calibration loader's advice on set size does not apply here
    try:
        images = prepare_calibration(weights, target, spec, size=count, seed=seed)
    finally:
        log.setLevel(level)
    return list(images.batches("NCHW", 1))


def sensitivity_for(weights, target, calibration, inputs: list[np.ndarray],
                    progress_factory: Callable | None = None, candidates: list[str] | None = None) -> SensitivityReport:
    """Export ``weights`` with ``target``'s settings and rank its blocks on the Q/DQ graph."""
    import contextlib
    import tempfile

    import onnx

    from .export import ExportOptions, export_onnx
    from .model import load_model

    if target.backend not in QDQ_BACKENDS + ("openvino",):
        raise EdgeYoloError(f"target {target.name}: sensitivity runs on the Q/DQ graph or OpenVINO's, "
                            f"not on {target.backend} (onnx2tf has no per-layer float fallback to choose for)")
    if target.head != "sigmoid":
        raise EdgeYoloError(f"target {target.name}: sensitivity needs head = \"sigmoid\", not {target.head!r}")
    settings = QuantizeSettings.from_target(target)
    if target.backend == "openvino":  # NNCF quantises every stage: rank on a Q/DQ graph that does too
        settings = dataclasses.replace(settings, float_from_stride=0)
    with tempfile.TemporaryDirectory(prefix="edgeyolo-sensitivity-") as work:
        path = export_onnx(load_model(weights).model, Path(work) / "model.onnx",
                           ExportOptions(imgsz=target.imgsz, opset=target.opset, head="sigmoid", batch=1))
        model = onnx.load(str(path))
        kept_nodes(model, candidates)  # unknown names: one clear line before any work
        total = len(candidates or layers(model)) + 1
        bar = progress_factory("sensitivity", total) if progress_factory else contextlib.nullcontext(None)
        with bar as advance:
            return qdq_sensitivity(path, calibration, inputs, settings, candidates, progress=advance)


# --------------------------------------------------------------------------- build --keep-float
BUILD_TIME_IMAGES = 16  # calibration images the build-time ranking (--keep-float N) measures on


def resolve_keep_float(spec: str | None, weights, target, calibration):
    """``target`` with ``[calibration] keep_float`` set from a ``--keep-float`` value.

    ``auto`` (or nothing): the target's own list, chosen on the tune split; ``none`` or ``0``: every
    layer INT8; ``N``: the N most sensitive blocks, ranked now on the calibration images; else a
    comma-separated list of layer names (``model.1,model.4``).
    """
    import dataclasses as dc

    if spec is None or spec.strip() == "auto":
        return target
    spec = spec.strip()
    if spec in ("none", "0"):
        names = []
    elif spec.isdigit():
        if target.backend not in QDQ_BACKENDS + ("openvino",):
            raise EdgeYoloError(f"target {target.name}: --keep-float needs a backend with a per-layer float "
                                f"fallback (onnxruntime, tensorrt, openvino), not {target.backend}")
        inputs = list(calibration.batches("NCHW", 1))[:BUILD_TIME_IMAGES]
        names = most_sensitive(sensitivity_for(weights, target, calibration, inputs), int(spec))
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names:
            raise EdgeYoloError(f"--keep-float: expected auto, none, a count or layer names, not {spec!r}")
    return dc.replace(target, calibration={**target.calibration, "keep_float": names})
