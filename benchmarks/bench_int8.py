"""INT8 recipes chosen on a held-out tune split, reported once on coco-val-500, with INT8 vs FP32 speed.

    python benchmarks/bench_int8.py study  [--out int8-study]   # the first study: everything on the tune split
    python benchmarks/bench_int8.py choose [--out int8-study]   # compare recipes on the tune split AND coco128 folds
    python benchmarks/bench_int8.py noise --candidates BASE OTHER...  # how noisy a comparison on n images is
    python benchmarks/bench_int8.py final  [--out int8-study]   # report: each INT8 target's defaults, coco-val-500
    python benchmarks/bench_int8.py speed  [--out int8-study]   # FP32 vs the final INT8 bundles, interleaved

The split (recorded in every result): coco-tune-1193's images, sorted by name, shuffled with
``random.Random(SPLIT_SEED)``; the first ``TUNE_COUNT`` are the **tune** set (every choice is
made by its mAP there), the other 793 are the **pool** that calibration sets larger than coco128
(300, 500 images) are drawn from. Calibration sets of 64 and 128 images come from coco128.
``choose`` adds a second held-out set because the tune split alone did not predict coco-val-500
(its images are re-encoded JPEGs): coco128 in two seeded halves, each calibrated on one half and
evaluated on the other; a recipe is taken only if it wins on both. coco-val-500 is only read by
``final``, for the targets' defaults once they are chosen.

Each variant is a real build (``build_bundle`` with the variant's ``[calibration]`` table) and a
real evaluation (``evaluate``, COCO mAP50-95); the proxy of ``edgeyolo sensitivity`` (objectness-
weighted head error vs FP32, ``PROXY_IMAGES`` tune images) is recorded beside each Q/DQ variant's
mAP, so the proxy's agreement with mAP is checked on the same variants. Results are appended as
JSON lines to ``OUT/results.jsonl`` (a variant already there is not measured again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

from bench_common import FIXTURES  # beside this script

SPLIT_SEED = 0
TUNE_COUNT = 400
PROXY_IMAGES = 64  # the proxy recorded beside each variant's mAP
RANKING_IMAGES = 16  # the per-layer ranking (26 variants): the first 16 of those
# the recipes before this study (chosen on coco-val-500 itself), rebuilt for the comparison
TODAY = {"cpu-int8": {"method": "mean-minmax", "float_from_stride": 32, "keep_float": [], "bias_correction": False,
                      "refit": False, "activations": "symmetric", "placement": "onnxruntime"},
         "intel-cpu-int8": {"openvino_activations_range": "histogram", "keep_float": []}}
WEIGHTS = FIXTURES / "weights" / "yolov5n.pt"
COCO128 = FIXTURES / "coco128" / "images"
TUNE = FIXTURES / "coco-tune-1193"
VAL = FIXTURES / "coco-val-500"


# --------------------------------------------------------------------------- the split
def tune_split():
    """(tune dataset, pool image paths): the seeded split of coco-tune-1193."""
    from edgeyolo.datasets import Dataset, load_dataset

    data = load_dataset(TUNE)
    samples = sorted(data.samples, key=lambda s: s.image.name)
    random.Random(SPLIT_SEED).shuffle(samples)
    tune = Dataset(root=str(TUNE), samples=samples[:TUNE_COUNT], names=data.names)
    return tune, [s.image for s in samples[TUNE_COUNT:]]


def coco128_halves():
    """coco128's samples sorted by name, shuffled with ``random.Random(SPLIT_SEED)``: (first 64, last 64)."""
    from edgeyolo.datasets import load_dataset

    data = load_dataset(FIXTURES / "coco128")
    samples = sorted(data.samples, key=lambda s: s.image.name)
    random.Random(SPLIT_SEED).shuffle(samples)
    half = len(samples) // 2
    return data, samples[:half], samples[half:]


def coco128_fold(fold: str, out: Path) -> tuple[str, int]:
    """Calibration list file for fold A (calibrate on the first half) or B (on the second)."""
    _, first, second = coco128_halves()
    images = first if fold == "A" else second
    listing = out / f"calib-coco128-{fold}.txt"
    listing.write_text("\n".join(str(s.image) for s in images) + "\n")
    return str(listing), len(images)


def coco128_eval_half(fold: str):
    """The half fold ``fold`` is evaluated on: the half it did not calibrate on."""
    from edgeyolo.datasets import Dataset

    data, first, second = coco128_halves()
    return Dataset(root=str(FIXTURES / "coco128"), samples=second if fold == "A" else first, names=data.names)


def split_facts() -> dict:
    return {"tune_set": str(TUNE), "split_seed": SPLIT_SEED, "tune_images": TUNE_COUNT,
            "order": "sorted by file name, then random.Random(seed).shuffle"}


def calibration_spec(size: int, out: Path, pool) -> tuple[str, int | None]:
    """64/128: coco128; larger: a list file of that many pool images (disjoint from the tune set)."""
    if size <= 128:
        return str(COCO128), size
    listing = out / f"calib-pool-{size}.txt"
    listing.write_text("\n".join(str(p) for p in pool[:size]) + "\n")
    return str(listing), size


# --------------------------------------------------------------------------- measuring one variant
class Study:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.results_path = out / "results.jsonl"
        self.done = {}
        if self.results_path.exists():
            for line in self.results_path.read_text().splitlines():
                row = json.loads(line)
                self.done[(row["phase"], row["name"])] = row
        self.tune, self.pool = tune_split()
        self._calibrations = {}
        self._proxy = None

    def record(self, row: dict) -> dict:
        self.done[(row["phase"], row["name"])] = row
        with self.results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("phase", "name", "map50_95", "proxy", "seconds") if k in row}),
              file=sys.stderr, flush=True)
        return row

    def calibration(self, target, size: int, fold: str = ""):
        from edgeyolo.build import prepare_calibration

        key = (target.imgsz, size, fold)
        if key not in self._calibrations:
            spec, count = calibration_spec(size, self.out, self.pool) if not fold else coco128_fold(fold, self.out)
            self._calibrations[key] = prepare_calibration(WEIGHTS, target, spec, count, seed=0)
        return self._calibrations[key]

    def variant(self, phase: str, name: str, target_name: str, dataset, size: int = 128, fold: str = "",
                **calibration) -> dict:
        """Build ``target_name`` with ``calibration`` overrides, evaluate on ``dataset``, record it.

        ``fold`` ("A" or "B"): calibrate on that half of coco128 (``coco128_fold``) instead of ``size`` images.
        """
        if (phase, name) in self.done:
            return self.done[(phase, name)]
        from edgeyolo.build import build_bundle
        from edgeyolo.targets import load_target

        start = time.perf_counter()
        target = load_target(target_name)
        overrides = {k: v for k, v in calibration.items() if not k.startswith("openvino_")}
        options = {k[len("openvino_"):]: v for k, v in calibration.items() if k.startswith("openvino_")}
        target = dataclasses.replace(target, calibration={**target.calibration, **overrides},
                                     backend_options={**target.backend_options, **options})
        bundle_path = self.out / "bundles" / f"{phase}-{name}"
        cal = self.calibration(target, size, fold) if target.needs_calibration else None
        bundle = build_bundle(WEIGHTS, target, bundle_path, calibration=cal)
        row = {"phase": phase, "name": name, "target": target.name, "calibration_images": len(cal) if cal else 0,
               "calibration_fold": fold,
               "recipe": {**target.calibration, **target.backend_options}, "bundle": str(bundle_path),
               "split": split_facts(), **self.evaluate(bundle, dataset)}
        if target.backend in ("onnxruntime", "tensorrt") and target.needs_calibration and phase != "choose":
            row["proxy"] = self.proxy(bundle)
        row["seconds"] = round(time.perf_counter() - start, 1)
        return self.record(row)

    def again(self, phase: str, name: str, built: dict, dataset) -> dict:
        """``built``'s bundle (a recorded row) evaluated on another dataset, recorded as ``name``."""
        if (phase, name) in self.done:
            return self.done[(phase, name)]
        start = time.perf_counter()
        row = {**{k: built[k] for k in ("target", "calibration_images", "calibration_fold", "recipe", "bundle")},
               "phase": phase, "name": name, "split": split_facts(), **self.evaluate(Path(built["bundle"]), dataset),
               "seconds": round(time.perf_counter() - start, 1)}
        return self.record(row)

    def evaluate(self, bundle, dataset) -> dict:
        from edgeyolo.evaluate import evaluate
        from edgeyolo.gate import load_for_eval

        result = evaluate(load_for_eval(bundle), dataset)
        return {"data": dataset.root, "images": result.images, "map50_95": round(result.map50_95 * 100, 3),
                "map50": round(result.map50 * 100, 3)}

    def proxy(self, bundle) -> float:
        """The sensitivity proxy of a Q/DQ bundle against the FP32 sigmoid-head graph, on tune images."""
        from edgeyolo.export import ExportOptions, export_onnx
        from edgeyolo.model import load_model
        from edgeyolo.sensitivity import OnnxRunner, proxy_error

        if self._proxy is None:
            inputs = self.proxy_inputs()
            reference = export_onnx(load_model(WEIGHTS).model, self.out / "fp32-sigmoid.onnx",
                                    ExportOptions(head="sigmoid"))
            run = OnnxRunner(inputs)
            self._proxy = (run, run(reference))
        run, reference = self._proxy
        return proxy_error(reference, run(bundle.file("onnx")))

    def proxy_inputs(self):
        from edgeyolo.runtime import read_image
        from edgeyolo.runtime.preprocess import LetterboxSettings, letterbox, to_input

        settings = LetterboxSettings(imgsz=(640, 640), auto=False, stride=32)
        return [to_input(letterbox(read_image(s.image), settings)[0], "NCHW")
                for s in self.tune.samples[:PROXY_IMAGES]]


# --------------------------------------------------------------------------- phases
def study(args) -> None:
    """Choose on the tune split: estimator, calibration size, kept layers (cpu-int8), NNCF ranges (intel)."""
    s = Study(Path(args.out))
    tune = s.tune
    s.variant("tune", "fp32", "cpu-fp32", tune, size=0)
    s.variant("tune", "cpu-int8-today", "cpu-int8", tune, **TODAY["cpu-int8"])
    for spec in args.methods:
        method, _, pct = spec.partition(":")
        extra = {"percentile": float(pct)} if pct else {}
        name = f"qdq-all-{method}" + (f"-{pct}" if pct else "")
        s.variant("tune", name, "cpu-int8", tune, **{**FIRST_STUDY, "method": method, **extra})
    best = best_of(s, "tune", "qdq-all-")
    recipe = dict(best["recipe"])
    for size in args.sizes:
        if size != 128:
            s.variant("tune", f"qdq-all-best-{size}", "cpu-int8", tune, size=size, **_qdq(recipe))
    sizes = {128: best} | {size: s.done[("tune", f"qdq-all-best-{size}")] for size in args.sizes if size != 128}
    size = max(sizes, key=lambda k: sizes[k]["map50_95"])
    ranking = rank_layers(s, recipe, size)
    for count in args.keep_counts:
        s.variant("tune", f"qdq-keep-{count}", "cpu-int8", tune, size=size,
                  **{**_qdq(recipe), "keep_float": ranking[:count]})
    s.variant("tune", "intel-today", "intel-cpu-int8", tune, **TODAY["intel-cpu-int8"])
    for ranges in args.nncf_ranges:
        s.variant("tune", f"intel-{ranges}", "intel-cpu-int8", tune, openvino_activations_range=ranges)
    for count in args.keep_counts[:1]:
        s.variant("tune", f"intel-keep-{count}", "intel-cpu-int8", tune, keep_float=ranking[:count],
                  openvino_activations_range=best_of(s, "tune", "intel-")["recipe"]["activations_range"])


def _qdq(recipe: dict) -> dict:
    keys = ("method", "percentile", "float_from_stride", "keep_float")
    return {**FIRST_STUDY, **{k: recipe[k] for k in keys if k in recipe}}


def best_of(s: Study, phase: str, prefix: str) -> dict:
    rows = [r for (p, n), r in s.done.items() if p == phase and n.startswith(prefix)]
    return max(rows, key=lambda r: r["map50_95"])


def rank_layers(s: Study, recipe: dict, size: int) -> list[str]:
    """The sensitivity ranking (proxy, tune images) under the chosen estimator and size; cached in OUT."""
    path = s.out / "sensitivity.json"
    if path.exists():
        return [row["layer"] for row in json.loads(path.read_text())["layers"]]
    from edgeyolo.sensitivity import sensitivity_for, write_report
    from edgeyolo.targets import load_target

    target = load_target("cpu-int8")
    target = dataclasses.replace(target, calibration={**target.calibration, **_qdq(recipe), "keep_float": []})
    report = sensitivity_for(WEIGHTS, target, s.calibration(target, size), s.proxy_inputs()[:RANKING_IMAGES])
    write_report(report, s.out)
    return report.ranked()


# recipes compared by ``choose`` (target, [calibration] / [openvino] overrides); see docs/int8.md for the
# NNCF-placed Q/DQ graph (nncf.quantize on the ONNX) that was compared too and removed
# every stage INT8; what a candidate does not name is pinned here, not inherited from the target's defaults
ALL_INT8 = {"float_from_stride": 0, "keep_float": [], "refit": False, "activations": "symmetric",
            "placement": "onnxruntime"}
FIRST_STUDY = {**ALL_INT8, "bias_correction": False}  # the first study's Q/DQ variants: no correction
CANDIDATES = {
    "cpu-today": ("cpu-int8", TODAY["cpu-int8"]),
    "cpu-today-bc": ("cpu-int8", {**TODAY["cpu-int8"], "bias_correction": True}),
    "cpu-ort-all-mean-minmax": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "bias_correction": False}),
    "cpu-ort-all-mean-minmax-bc": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "bias_correction": True}),
    "cpu-ort-all-minmax-bc": ("cpu-int8", {**ALL_INT8, "method": "minmax", "bias_correction": True}),
    "cpu-ort-all-percentile": ("cpu-int8", {**ALL_INT8, "method": "percentile", "percentile": 99.99,
                                            "bias_correction": False}),
    "cpu-ort-all-percentile-bc": ("cpu-int8", {**ALL_INT8, "method": "percentile", "percentile": 99.99,
                                               "bias_correction": True}),
    # least-squares weight re-fit (optimize/qat/refit.py) at four ridge strengths
    **{f"cpu-ort-all-mean-minmax-refit-r{ridge}": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                              "refit_ridge": float(ridge)})
       for ridge in ("1e-2", "1e-1", "1", "10")},
    # the same, each output's error weighted by its activation's slope² (the error after SiLU / sigmoid)
    **{f"cpu-ort-all-mean-minmax-refit-act-r{ridge}": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                                  "refit_ridge": float(ridge),
                                                                  "refit_weighting": "activation"})
       for ridge in ("1e-1", "1")},
    # the re-fit default with the head convolutions (the most sensitive block after the first) in float
    "cpu-ort-all-mean-minmax-refit-r1-keep24": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                            "refit_ridge": 1.0, "keep_float": ["model.24"]}),
    # asymmetric activations (each tensor's own uint8 zero point; ONNX Runtime only, not TensorRT)
    "cpu-ort-all-mean-minmax-asym": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "activations": "asymmetric"}),
    "cpu-ort-all-mean-minmax-refit-r1-asym": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                          "refit_ridge": 1.0, "activations": "asymmetric"}),
    # Q/DQ only on layer inputs (TensorRT's fused Conv+BN+SiLU); symmetric, and asymmetric for comparison
    "cpu-ort-all-mean-minmax-refit-r1-trt": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                         "refit_ridge": 1.0, "placement": "tensorrt"}),
    "cpu-ort-all-mean-minmax-refit-r1-trt-asym": ("cpu-int8", {**ALL_INT8, "method": "mean-minmax", "refit": True,
                                                              "refit_ridge": 1.0, "placement": "tensorrt",
                                                              "activations": "asymmetric"}),
    "intel-today": ("intel-cpu-int8", TODAY["intel-cpu-int8"]),
    "intel-histogram-full-bc": ("intel-cpu-int8", {"openvino_activations_range": "histogram",
                                                   "openvino_fast_bias_correction": False}),
}


def choose(args) -> None:
    """Compare ``CANDIDATES`` on the two held-out choosing sets (never coco-val-500).

    - tune: the 400 tune images of coco-tune-1193 (re-encoded JPEG q82), calibrated on all of coco128;
    - cv: coco128 in two seeded halves, each calibrated on one half and evaluated on the other
      (original COCO JPEGs, as deployment images are; training images of YOLOv5n, so only drops count).
    A recipe is chosen only if it is better on both.

    ``--wide``: each tune-set bundle is also evaluated on all 1,193 images of coco-tune-1193 (the tune
    split and the pool: none of them calibrates these bundles), three times the tune set's images.
    """
    s = Study(Path(args.out))
    fp32 = {"tune": s.variant("choose", "fp32-tune", "cpu-fp32", s.tune, size=0)["map50_95"]}
    if args.wide:
        from edgeyolo.datasets import load_dataset

        wide = load_dataset(TUNE)
        fp32["wide"] = s.again("choose", "fp32-wide", s.done[("choose", "fp32-tune")], wide)["map50_95"]
    for fold in "AB":
        fp32[fold] = s.variant("choose", f"fp32-cv{fold}", "cpu-fp32", coco128_eval_half(fold), size=0)["map50_95"]
    table = []
    for name in args.candidates:
        target, recipe = CANDIDATES[name]
        built = s.variant("choose", f"{name}-tune", target, s.tune, **recipe)
        drops = {"tune": built["map50_95"] - fp32["tune"]}
        if args.wide:
            drops["wide"] = s.again("choose", f"{name}-wide", built, wide)["map50_95"] - fp32["wide"]
        if not args.tune_only:
            for fold in "AB":
                row = s.variant("choose", f"{name}-cv{fold}", target, coco128_eval_half(fold), fold=fold, **recipe)
                drops[fold] = row["map50_95"] - fp32[fold]
            drops["cv"] = (drops["A"] + drops["B"]) / 2
        table.append({"name": name, **{k: round(v, 3) for k, v in drops.items()}})
        print(json.dumps(table[-1]), file=sys.stderr, flush=True)
    (Path(args.out) / "choose.json").write_text(json.dumps({"fp32": fp32, "drops": table}, indent=2) + "\n")
    print(json.dumps({"fp32": fp32, "drops": table}, indent=2))


def noise(args) -> None:
    """How far apart two recipes' drops land by chance on n images: the decision rule's error bars.

    Each candidate's tune-set bundle (``choose`` built it, calibrated on coco128) is evaluated once on
    all of coco-tune-1193, keeping its detections; then ``--draws`` seeded subsets of n images are
    scored for every candidate, and the spread of (candidate − first candidate) gives the standard
    deviation of a paired comparison on n images. Written to ``OUT/noise.json``.
    """
    import numpy as np

    import edgeyolo.evaluate as ev
    from edgeyolo.bundle import load_bundle
    from edgeyolo.datasets import load_dataset
    from edgeyolo.gate import load_for_eval

    s = Study(Path(args.out))
    wide = load_dataset(TUNE)
    names = ["fp32", *args.candidates]
    scored = {}  # name -> (images, annotations, predictions, class names), as evaluate() hands them to coco_map
    score = ev.coco_map
    try:
        for name in names:
            ev.coco_map = lambda *parts, name=name: scored.__setitem__(name, parts) or score(*parts)  # noqa: E731
            ev.evaluate(load_for_eval(load_bundle(Path(s.done[("choose", f"{name}-tune")]["bundle"]))), wide)
    finally:
        ev.coco_map = score

    def subset_map(name, keep):
        images, annotations, predictions, classes = scored[name]
        return score([i for i in images if i["id"] in keep], [a for a in annotations if a["image_id"] in keep],
                     [p for p in predictions if p["image_id"] in keep], classes)[0] * 100

    ids = [image["id"] for image in scored["fp32"][0]]
    rng = random.Random(SPLIT_SEED)
    report = {"images": len(ids), "draws": args.draws, "baseline": args.candidates[0], "sizes": {}}
    for size in args.noise_sizes:
        gaps = {name: [] for name in args.candidates[1:]}
        for _ in range(args.draws):
            keep = set(rng.sample(ids, size))
            maps = {name: subset_map(name, keep) for name in args.candidates}
            for name in gaps:
                gaps[name].append(maps[name] - maps[args.candidates[0]])
        report["sizes"][size] = {name: {"mean": round(float(np.mean(g)), 3), "sd": round(float(np.std(g)), 3)}
                                 for name, g in gaps.items()}
        print(json.dumps({size: report["sizes"][size]}), file=sys.stderr, flush=True)
    (Path(args.out) / "noise.json").write_text(json.dumps(report, indent=2) + "\n")


def final(args) -> None:
    """The one measurement on coco-val-500: FP32 and each INT8 target's defaults (its own TOML, no overrides)."""
    from edgeyolo.datasets import load_dataset

    s = Study(Path(args.out))
    val = load_dataset(VAL)
    s.variant("val", "fp32", "cpu-fp32", val, size=0)
    for target in args.targets:
        s.variant("val", f"{target}-default", target, val)


def speed(args) -> None:
    """Interleaved end-to-end FPS of FP32 and the INT8 bundles of the final phase, in one process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import run_interleaved, write_speed_report

    s = Study(Path(args.out))
    bundles = {n: Path(r["bundle"]) for (p, n), r in s.done.items()
               if p == "val" and not n.startswith("arm-") and (n == "fp32" or n.startswith(tuple(args.targets)))}
    for key in args.also:  # other bundles of OUT to time beside them, as PHASE:NAME
        phase, _, name = key.partition(":")
        bundles[name] = Path(s.done[(phase, name)]["bundle"])
    ns = argparse.Namespace(images=str(FIXTURES / "images"), threads=None, warmup=5, rounds=args.rounds,
                            iters=args.iters)
    write_speed_report(run_interleaved(bundles, ns), Path(args.out) / "speed.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("study", "choose", "noise", "final", "speed"))
    parser.add_argument("--out", default="int8-study")
    parser.add_argument("--methods", nargs="*", default=["mean-minmax", "percentile:99.99", "entropy"],
                        help="study: Q/DQ estimators (percentile:P for a percentile)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 300])
    parser.add_argument("--keep-counts", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--nncf-ranges", nargs="*", default=["mean_minmax"], help="study: NNCF estimators")
    parser.add_argument("--targets", nargs="*", default=["cpu-int8", "intel-cpu-int8", "arm-int8"])
    parser.add_argument("--also", nargs="*", default=[], help="speed: more bundles of OUT to time, as PHASE:NAME")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="choose: recipes to compare")
    parser.add_argument("--tune-only", action="store_true", help="choose: the tune set only (no coco128 folds)")
    parser.add_argument("--wide", action="store_true", help="choose: also all of coco-tune-1193 (tune + pool)")
    parser.add_argument("--noise-sizes", type=int, nargs="*", default=[64, 128, 400], help="noise: subset sizes")
    parser.add_argument("--draws", type=int, default=40, help="noise: subsets per size")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    {"study": study, "choose": choose, "noise": noise, "final": final, "speed": speed}[args.phase](args)


if __name__ == "__main__":
    main()
