"""QAT vs PTQ on the INT8 targets: chosen on coco-tune-1193's held-out tune split, reported on coco-val-500.

    python benchmarks/bench_qat.py train --out qat-study [--name default] [QAT options]   # QAT on the pool
    python benchmarks/bench_qat.py proxy --out qat-study --runs default [--images 16]       # choose: tune proxy
    python benchmarks/bench_qat.py eval  --out qat-study --set tune|coco128|val [--runs default] [--only-qat]  # mAP
    python benchmarks/bench_qat.py speed --out qat-study [--rounds 10 --iters 10]           # FPS vs FP32

The split is ``bench_int8``'s (coco-tune-1193 sorted by name, ``random.Random(0)`` shuffle): the
first 400 images are the **tune** set (settings are chosen on it), the other 793 the **pool** QAT
trains on (label-free). Calibration: coco128 (128 images), for PTQ and for QAT's initial ranges.
``--set coco128`` is a second choosing set: the calibration images, which QAT never trains on,
original COCO JPEGs as coco-val-500's are (the tune split and the pool are re-encoded at JPEG
quality 82, and QAT chosen on tune has over-promised on coco-val-500). ``--seed`` (train) varies
the image order and flips: the spread between seeds is as large as the recipes' differences.
The PTQ row of each run uses the very placement the run trained (method, float stage, kept layers).
Results are JSON lines in ``OUT/results.jsonl``; ``speed`` writes ``OUT/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import FIXTURES  # noqa: E402  (beside this script)
from bench_int8 import split_facts, tune_split  # noqa: E402

WEIGHTS = FIXTURES / "weights" / "yolov5n.pt"
COCO128 = FIXTURES / "coco128" / "images"
VAL = FIXTURES / "coco-val-500"


def write_pool(out: Path) -> Path:
    _, pool = tune_split()
    path = out / "pool.txt"
    path.write_text("".join(f"{p.resolve()}\n" for p in pool))
    return path


def train(args) -> None:
    from edgeyolo.optimize.qat.trainer import QatConfig, QatRun

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = QatConfig(weights=str(WEIGHTS), data=str(write_pool(out)), calib=str(COCO128), out=str(out / args.name),
                       imgsz=args.imgsz, calib_imgsz=args.imgsz_calib, epochs=args.epochs, batch=args.batch, lr=args.lr, scale_lr=args.scale_lr,
                       learn_scales=not args.fixed_scales, limit=args.limit, calib_size=128,
                       float_from_stride=args.float_from_stride, seed=args.seed,
                       **({"target": args.target} if args.target else {}))
    start = time.perf_counter()
    QatRun(config).run()
    record(out, {"phase": "train", "name": args.name, "seconds": round(time.perf_counter() - start, 1),
                 "config": {k: v for k, v in vars(args).items() if k not in ("phase", "out")}, "split": split_facts()})


def dataset_for(name: str):
    from edgeyolo.datasets import load_dataset

    if name == "tune":
        return tune_split()[0]
    return load_dataset(COCO128.parent if name == "coco128" else VAL)


def evaluate(bundle, dataset) -> dict:
    from edgeyolo.evaluate import evaluate as run
    from edgeyolo.gate import load_for_eval

    result = run(load_for_eval(bundle), dataset)
    return {"images": result.images, "map50_95": round(result.map50_95 * 100, 3), "map50": round(result.map50 * 100, 3)}


def eval_phase(args) -> None:
    """FP32, then for each QAT run: PTQ with its placement and QAT, on cpu-int8 (+ intel-cpu-int8)."""
    import dataclasses

    from edgeyolo.build import build_bundle, prepare_calibration
    from edgeyolo.optimize.qat.learned import learned_ranges_for
    from edgeyolo.targets import load_target

    out = Path(args.out)
    dataset = dataset_for(args.set)
    done = {(r["phase"], r["name"]) for r in read_results(out)}
    phase = f"eval-{args.set}"

    def row(name, weights, target, calibration):
        if (phase, name) in done:
            return
        start = time.perf_counter()
        path = out / "bundles" / f"{args.set}-{name}"
        bundle = build_bundle(weights, target, path, calibration=calibration)
        record(out, {"phase": phase, "name": name, "target": target.name, "bundle": str(path),
                     "recipe": target.calibration, **evaluate(bundle, dataset),
                     "seconds": round(time.perf_counter() - start, 1), "split": split_facts()})

    if not args.only_qat:
        row("fp32", WEIGHTS, load_target("cpu-fp32"), None)
    for run in args.runs:
        checkpoint = out / run / "qat.safetensors"
        learned = learned_ranges_for(checkpoint)
        settings = learned.qat["settings"]
        for target_name in args.targets:
            target = ptq_target(target_name, settings)
            if not args.only_qat:
                row(f"{target_name}-{run}-ptq", WEIGHTS, target, prepare_calibration(WEIGHTS, target, str(COCO128), 128))
            row(f"{target_name}-{run}-qat", checkpoint, dataclasses.replace(
                target, calibration={**target.calibration, "keep_float": learned.keep_float}), learned)


def ptq_target(target_name: str, settings: dict):
    """The PTQ baseline of a QAT run: an ONNX Runtime target takes the placement and activations QAT
    trained (symmetric where the run predates the setting); other backends keep their own recipe."""
    import dataclasses

    from edgeyolo.targets import load_target

    target = load_target(target_name)
    if target.backend != "onnxruntime":
        return target
    return dataclasses.replace(target, calibration={**target.calibration, "activations": "symmetric", **settings})


def proxy(args) -> None:
    """The sensitivity proxy at 640 on the first ``--images`` tune images: FP32 vs PTQ vs each QAT checkpoint.

    PTQ = the checkpoint's own recorded calibrated ranges on the FP32 weights (the graph QAT started from).
    """
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime.quantization as q

    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model
    from edgeyolo.optimize.qat.learned import learned_ranges_for
    from edgeyolo.quantize import Ranges, kept_nodes, write_qdq
    from edgeyolo.sensitivity import OnnxRunner, letterboxed_inputs, proxy_error
    from edgeyolo.targets import load_target

    out = Path(args.out)
    tune, _ = tune_split()
    listing = out / "tune-proxy.txt"
    listing.write_text("".join(f"{s.image.resolve()}\n" for s in tune.samples[:args.images]))
    run = OnnxRunner(letterboxed_inputs(str(listing), WEIGHTS, load_target("cpu-int8"), args.images))
    options = ExportOptions(imgsz=(640, 640), head="sigmoid")
    with tempfile.TemporaryDirectory() as work:
        fp32 = export_onnx(load_model(WEIGHTS).model, Path(work) / "fp32.onnx", options)
        reference = run(fp32)
        for name in args.runs:
            checkpoint = out / name / "qat.safetensors"
            learned = learned_ranges_for(checkpoint)
            data = {t: q.TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                    for t, (lo, hi) in learned.qat["ranges"].items()}
            settings = learned.settings()
            ptq, _ = write_qdq(fp32, Ranges(q.TensorsData(q.CalibrationMethod.MinMax, data), 0), settings,
                               extra_float=kept_nodes(onnx.load(str(fp32)), settings.keep_float))
            trained = export_onnx(load_model(checkpoint).model, Path(work) / f"{name}.onnx", options)
            record(out, {"phase": "proxy", "name": name, "images": args.images, "split": split_facts(),
                         "training": learned.qat["training"], "ptq": proxy_error(reference, run(ptq)),
                         "qat": proxy_error(reference, run(learned.qdq_model(trained)[0]))})


def speed(args) -> None:
    """End-to-end FPS of each bundle of ``--set``'s eval, interleaved in one process, as a ratio to FP32."""
    from bench_common import run_interleaved, write_speed_report

    from edgeyolo.build import build_bundle, prepare_calibration
    from edgeyolo.optimize.qat.learned import learned_ranges_for

    out = Path(args.out)
    bundles = {r["name"]: Path(r["bundle"]) for r in read_results(out) if r["phase"] == f"eval-{args.set}"}
    # with --only-qat evaluations, the FP32 and PTQ bundles are built here (speed needs no accuracy)
    if "fp32" not in bundles:
        bundles["fp32"] = build_bundle(WEIGHTS, "cpu-fp32", out / "bundles" / "speed-fp32").path
    for run in args.runs:
        settings = learned_ranges_for(out / run / "qat.safetensors").qat["settings"]
        for target_name in args.targets:
            name = f"{target_name}-{run}-ptq"
            if name not in bundles and not args.only_qat:
                target = ptq_target(target_name, settings)
                calibration = prepare_calibration(WEIGHTS, target, str(COCO128), 128)
                bundles[name] = build_bundle(WEIGHTS, target, out / "bundles" / f"speed-{name}",
                                             calibration=calibration).path
    ns = argparse.Namespace(images=str(FIXTURES / "images"), threads=None, warmup=5, rounds=args.rounds,
                            iters=args.iters)
    write_speed_report(run_interleaved(bundles, ns), out / "speed.json")


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def record(out: Path, row: dict) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("phase", "name", "map50_95", "ptq", "qat", "seconds") if k in row}), file=sys.stderr,
          flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("train", "proxy", "eval", "speed"))
    parser.add_argument("--images", type=int, default=16, help="proxy: tune images")
    parser.add_argument("--out", default="qat-study")
    parser.add_argument("--name", default="default", help="train: the run's folder name")
    parser.add_argument("--imgsz", type=int, default=640, help="train: training size")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz-calib", type=int, default=640, help="train: ranges calibrated at this size")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--scale-lr", type=float, default=5e-3)
    parser.add_argument("--fixed-scales", action="store_true", help="train: keep the calibrated activation scales")
    parser.add_argument("--seed", type=int, default=0, help="train: image order and flips (run-to-run spread)")
    parser.add_argument("--limit", type=int, help="train: images of the pool used (default: all 793)")
    parser.add_argument("--float-from-stride", type=int, help="train: override the target's float stage")
    parser.add_argument("--target", help="train: the INT8 target whose graph is trained (default: edgeyolo qat's)")
    parser.add_argument("--set", choices=("tune", "coco128", "val"), default="tune")
    parser.add_argument("--runs", nargs="*", default=["default"])
    parser.add_argument("--targets", nargs="*", default=["cpu-int8", "intel-cpu-int8"])
    parser.add_argument("--only-qat", action="store_true",
                        help="eval: only the QAT bundles (FP32 and PTQ rows measured before with the same recipe)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    {"train": train, "proxy": proxy, "eval": eval_phase, "speed": speed}[args.phase](args)


if __name__ == "__main__":
    main()
