"""The accuracy gate: measure a freshly built engine against the FP32 reference before it is committed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bundle import Bundle
from .errors import AccuracyGateError, EdgeYoloError
from .log import log


def load_for_eval(bundle: Bundle, backend: str | None = None, verify: bool = True):
    """A ``Detector`` for ``bundle``; where its own backend cannot run here, its ONNX on ONNX Runtime.

    That fallback is what lets a TensorRT bundle's INT8 accuracy be measured on a CPU.
    """
    from .runtime import load

    try:
        return load(bundle, verify=verify, backend=backend)
    except EdgeYoloError:
        if backend is not None or "onnx" not in bundle.manifest["backend"]["files"]:
            raise
        log.warning("the %s backend is not available here; evaluating the bundle's ONNX on onnxruntime", bundle.backend)
        return load(bundle, verify=verify, backend="onnxruntime")


def reference_result(weights, dataset, progress=None):
    """The cpu-fp32 reference's accuracy on ``dataset``, cached in the cached reference bundle's manifest."""
    from .build import cached_reference_bundle
    from .evaluate import EvalResult, evaluate
    from .runtime import load

    reference = cached_reference_bundle(weights)
    key = f"{Path(dataset.root).resolve()}#{len(dataset)}"
    cached = reference.manifest.get("evaluations", {}).get(key)
    if cached:
        return EvalResult(**cached)
    result = evaluate(load(reference), dataset, progress=progress)
    reference.update_manifest(evaluations={**reference.manifest.get("evaluations", {}), key: result.to_dict()})
    return result


def accuracy_gate(weights, val: str | Path, max_drop: float, progress_factory: Callable | None = None,
                  report: Callable[[dict], None] | None = None):
    """A ``gate`` for ``build_bundle``: evaluates the candidate and the reference, records both, and
    raises ``AccuracyGateError`` (exit status 1) when mAP50-95 drops by more than ``max_drop`` points."""
    from .datasets import load_dataset
    from .evaluate import evaluate

    dataset = load_dataset(val)

    def gate(candidate: Bundle) -> None:
        with _progress(progress_factory, "reference cpu-fp32", len(dataset)) as advance:
            ref = reference_result(weights, dataset, progress=advance)
        detector = load_for_eval(candidate, verify=False)
        with _progress(progress_factory, candidate.target["name"], len(dataset)) as advance:
            result = evaluate(detector, dataset, progress=advance)
        drop = round((ref.map50_95 - result.map50_95) * 100, 3)
        accuracy = {
            "data": str(val), "images": result.images, "max_drop_points": max_drop, "drop_points": drop,
            "passed": drop <= max_drop, "evaluated_with": detector.engine.info.get("backend"),
            "reference": {"target": "cpu-fp32", "map50_95": ref.map50_95, "map50": ref.map50},
            "this": {"target": candidate.target["name"], "map50_95": result.map50_95, "map50": result.map50},
        }
        candidate.manifest["accuracy"] = accuracy
        if report:
            report(accuracy)
        if drop > max_drop:
            raise AccuracyGateError(
                f"accuracy gate failed: mAP50-95 {result.map50_95 * 100:.2f} vs reference {ref.map50_95 * 100:.2f} "
                f"(drop {drop:.2f} points > --max-drop {max_drop}); no bundle written"
            )

    return gate


class _progress:
    def __init__(self, factory, label, total):
        self.factory, self.label, self.total = factory, label, total
        self.ctx = None

    def __enter__(self):
        if self.factory is None:
            return None
        self.ctx = self.factory(self.label, self.total)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
