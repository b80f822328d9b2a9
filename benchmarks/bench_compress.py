"""Compression rows side by side: baseline, zeroing, structured pruning (+ recovery), ReLU + distillation.

Each row: params, GFLOPs@640, ONNX size, mAP50-95/mAP50 on coco-val-500 (--eval), and
intel-cpu-fp32 (+ intel-cpu-int8 with --int8) inference / end-to-end latency, every engine
measured alternately in one process (round after round) so machine load hits all rows alike.
Recovery rows (--train) train only on coco-tune-1193 with the stated budget; never on the
evaluation set.

    PYTHONPATH=$PWD python benchmarks/bench_compress.py --out runs/compress --train-only   # the recovery runs
    PYTHONPATH=$PWD python benchmarks/bench_compress.py --out runs/compress --train --eval --int8 --arm
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import FIXTURES, ensure_bundles, run_interleaved, target_bench_parser  # noqa: E402

RECOVERY_ROWS = ("fine-tune", "distill-label-free", "distill-labels", "relu")
START_POINTS = ("sensitivity", "uniform", "sensitivity-reconstructed", "uniform-reconstructed")
RECONSTRUCTED = " + reconstruction"


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "intel-cpu-int8")
    parser.set_defaults(out="runs/compress", rounds=5, iters=10, warmup=5)
    parser.add_argument("--threads", type=int, help="Inference threads [default: the backend's].")
    parser.add_argument("--eval", action="store_true", help="mAP on coco-val-500 for every bundle (slow on 2 cores).")
    parser.add_argument("--val", default=str(FIXTURES / "coco-val-500"))
    parser.add_argument("--int8", action="store_true", help="Also build and time intel-cpu-int8 bundles.")
    parser.add_argument("--eval-int8-all", action="store_true",
                        help="Evaluate every row's INT8 bundles too (default: only the baseline and ReLU rows).")
    parser.add_argument("--arm", action="store_true",
                        help="Also arm-fp32 / arm-int8 (TFLite) bundles of the baseline and ReLU rows.")
    parser.add_argument("--train", action="store_true", help="Also the recovery rows (fine-tune / distill).")
    parser.add_argument("--train-only", action="store_true", help="Make the checkpoints and training runs, stop.")
    parser.add_argument("--tune", default=str(FIXTURES / "coco-tune-1193"), help="Training data for recovery.")
    parser.add_argument("--hold-out", type=float, default=0.1,
                        help="Seeded fraction of --tune held out to pick best (never trained on).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="Recovery budget: epochs.")
    parser.add_argument("--lr0", type=float, default=0.001, help="Recovery budget: learning rate.")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw", help="Recovery budget: optimiser.")
    parser.add_argument("--warmup-epochs", type=float, default=0.0,
                        help="Recovery budget: warm-up epochs (YOLOv5's: at least 100 iterations when > 0).")
    parser.add_argument("--imgsz", type=int, default=640, help="Recovery budget: training image size.")
    parser.add_argument("--batch", type=int, default=16, help="Recovery budget: batch (one optimiser step each).")
    parser.add_argument("--temperature", type=float, default=2.0, help="Distillation temperature.")
    parser.add_argument("--feature-gain", type=float, default=0.02, help="Distillation feature-imitation gain.")
    parser.add_argument("--round-to", type=int, default=16,
                        help="Channel multiple of the pruned rows (16 = one AVX-512 fp32 block).")
    parser.add_argument("--recover-round-to", type=int, default=8,
                        help="Channel multiple of the recovered 30%%-GFLOPs model (8 lands nearest 30%%).")
    parser.add_argument("--bn-calib-size", type=int, default=128,
                        help="Tune-train images the pruned rows re-estimate BatchNorm statistics on.")
    parser.add_argument("--sensitivity-images", type=int, default=32,
                        help="Tune-train images the sensitivity allocation measures each group's damage on.")
    parser.add_argument("--sensitivity-imgsz", type=int, default=320, help="Their letterbox size.")
    parser.add_argument("--sensitivity-row", action="store_true",
                        help="Also the sensitivity-allocated 30%% model when recovery does not start from it.")
    parser.add_argument("--warmup-bias-lr", type=float, default=0.1,
                        help="Recovery budget: the bias LR warm-up starts from (YOLOv5: 0.1; 0 = no spike).")
    parser.add_argument("--reconstruct-images", type=int, default=64,
                        help="Tune-train images (at 640) the reconstruction rows fit every layer on.")
    parser.add_argument("--recover-from", choices=START_POINTS, default="sensitivity",
                        help="Which 30%%-GFLOPs model the recovery rows start from (…-reconstructed: after "
                             "least-squares reconstruction; the relu row then starts from the reconstructed swap).")
    parser.add_argument("--recovery", default=",".join(RECOVERY_ROWS),
                        help="Comma-separated recovery rows to train and report (%(default)s).")
    return parser.parse_args(argv)


def split_tune(args, out: Path) -> tuple[Path, Path]:
    """coco-tune-1193 as two linked YOLO folders: train and the seeded held-out split (the Trainer's own)."""
    from edgeyolo.train.data import load_train_data

    data = load_train_data(args.tune, None, args.hold_out, args.seed)
    folders = []
    for name, dataset in (("train", data.train), ("hold", data.val)):
        folder = out / f"tune-{name}-seed{args.seed}"
        for sub in ("images", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for sample in dataset.samples:
            image = Path(sample.image)
            label = image.parent.parent / "labels" / f"{image.stem}.txt"
            for src, dst in ((image, folder / "images" / image.name), (label, folder / "labels" / label.name)):
                if src.exists() and not dst.exists():
                    dst.symlink_to(src.resolve())
        folders.append(folder)
    return folders[0], folders[1]


def recalibrated(model, images: Path, size: int):
    """One-shot pruning shifts every next layer's input mean: BatchNorm statistics re-estimated (no labels)
    on mosaics of tune-train images, the distribution the statistics belong to."""
    from edgeyolo.optimize.batchnorm import recalibrate_batchnorm, training_batches

    recalibrate_batchnorm(model, training_batches(images, size, 640))
    return model


def calibration_batches(images: Path, size: int, imgsz: int) -> list:
    from edgeyolo.calibration import load_calibration
    from edgeyolo.optimize.batchnorm import letterboxed_batches
    from edgeyolo.runtime.preprocess import LetterboxSettings

    return list(letterboxed_batches(load_calibration(images, LetterboxSettings(imgsz=(imgsz, imgsz)),
                                                     size=size).letterboxed))


def pruned_name(fraction: int, round_to: int, allocation: str = "uniform") -> str:
    return f"pruned-{fraction}%-gflops r{round_to}" + (" sensitivity" if allocation == "sensitivity" else "")


def start_name(recover_from: str, round_to: int) -> str:
    """The variant a recovery run starts from (``…-reconstructed``: that model after reconstruction)."""
    allocation = recover_from.replace("-reconstructed", "")
    name = pruned_name(30, round_to, allocation)
    return name + RECONSTRUCTED if recover_from.endswith("-reconstructed") else name


def make_variants(args, out: Path, tune_train: Path) -> dict[str, Path]:
    """Checkpoints of the rows that need no training (pruning + BatchNorm re-estimation; the sensitivity
    allocation measures every layer group first, minutes)."""
    from edgeyolo.model import load_model, save_model
    from edgeyolo.optimize.act_swap import swap_activation
    from edgeyolo.optimize.measure import model_size
    from edgeyolo.optimize.prune import prune
    from edgeyolo.optimize.zeroing import zero_smallest

    base = load_model(args.weights).model.float().eval()
    gflops = model_size(base).gflops
    variants = {"baseline": Path(args.weights)}
    r, rr, images, n = args.round_to, args.recover_round_to, tune_train / "images", args.bn_calib_size

    def pruned(fraction, round_to, allocation="uniform"):
        def make(m):
            sens = calibration_batches(images, args.sensitivity_images, args.sensitivity_imgsz) \
                if allocation == "sensitivity" else ()
            result = prune(m, target_gflops=fraction * gflops, round_to=round_to, allocation=allocation, images=sens)
            choice = {"allocation": allocation, "groups": result.allocation} if result.allocation else {}
            return recalibrated(result.model, images, n), choice
        return make

    def reconstructed(source):
        def make(_):
            from edgeyolo.optimize.reconstruct import reconstruct

            from edgeyolo.optimize.batchnorm import training_batches

            model = load_model(variants[source]).model.float().eval()
            fit = training_batches(images, args.reconstruct_images, 640, seed=1)
            report = reconstruct(model, copy.deepcopy(base), fit)
            return model, {"reconstruction": report.describe()}
        return make

    specs = {"zeroing-30%": lambda m: zero_smallest(m, 0.3),
             pruned_name(30, rr): pruned(0.7, rr),
             pruned_name(50, r): pruned(0.5, r),
             pruned_name(50, 8): pruned(0.5, 8),
             "relu swap": lambda m: swap_activation(m, "relu")}
    if args.recover_from.startswith("sensitivity") or args.sensitivity_row:
        specs[pruned_name(30, rr, "sensitivity")] = pruned(0.7, rr, "sensitivity")
    if "reconstructed" in args.recover_from:
        for source in (start_name(args.recover_from.replace("-reconstructed", ""), rr), "relu swap"):
            specs[source + RECONSTRUCTED] = reconstructed(source)
    for name, make in specs.items():
        path = out / "weights" / f"{name.replace(' ', '_')}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            began = time.perf_counter()
            made = make(copy.deepcopy(base))
            model, choice = made if isinstance(made, tuple) else (made, {})  # pruned rows: their allocation too
            save_model(model, path, meta={**choice, "bench_compress": name,
                                          "seconds": round(time.perf_counter() - began)})
        variants[name] = path
    return variants


def recovery_variants(args, out: Path, variants: dict[str, Path], tune_train: Path, hold: Path) -> dict[str, Path]:
    """Fine-tune / distil the 30%-GFLOPs model, and the ReLU swap, at one stated budget on tune-train;
    ``best`` picked on the held-out tune split."""
    from edgeyolo.optimize.distill import DistillWeights
    from edgeyolo.optimize.distill_trainer import DistillTrainer
    from edgeyolo.train.hyp import load_hyp
    from edgeyolo.train.trainer import TrainConfig, Trainer

    start = str(variants[start_name(args.recover_from, args.recover_round_to)])
    relu_start = str(variants["relu swap" + (RECONSTRUCTED if "reconstructed" in args.recover_from else "")])
    kd = DistillWeights(temperature=args.temperature, feature=args.feature_gain)
    prefix = f"pruned-30% {args.recover_from}" if args.recover_from != "uniform" else "pruned-30%"
    runs = {
        "fine-tune": (f"{prefix} + fine-tune", lambda c: Trainer(c)),
        "distill-label-free": (f"{prefix} + distill (label-free)",
                               lambda c: DistillTrainer(c, args.weights, label_free=True, weights=kd)),
        "distill-labels": (f"{prefix} + distill + labels", lambda c: DistillTrainer(c, args.weights, weights=kd)),
        "relu": ("relu" + (" reconstructed" if "reconstructed" in args.recover_from else "") + " + distill + labels",
                 lambda c: DistillTrainer(c, args.weights, weights=kd)),
    }
    chosen = [key.strip() for key in args.recovery.split(",") if key.strip()]
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        raise SystemExit(f"--recovery: unknown row {unknown[0]!r} (rows: {', '.join(RECOVERY_ROWS)})")
    found = {}
    for name, make in (runs[key] for key in chosen):
        run = out / "runs" / name.replace(" ", "").replace("+", "_").replace("(", "").replace(")", "")
        if not (run / "best.safetensors").exists():
            weights = relu_start if name.startswith("relu") else start
            data = str(tune_train / "images") if "label-free" in name else str(tune_train)
            config = TrainConfig(weights=weights, data=data, out=str(run), epochs=args.epochs, imgsz=args.imgsz,
                                 batch=args.batch, nominal_batch=args.batch, val_data=str(hold), seed=args.seed,
                                 hyp=load_hyp(None, {"lr0": args.lr0, "warmup_epochs": args.warmup_epochs,
                                                        "warmup_bias_lr": args.warmup_bias_lr}),
                                 optimizer=args.optimizer,
                                 workers=1, command=f"bench_compress {name}")
            began = time.perf_counter()
            make(config).train()
            (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - began:.0f}\n")
        found[name] = run / "best.safetensors"
    return found


def describe(name: str, weights: Path, out: Path) -> dict:
    from edgeyolo.export import ExportOptions, export_onnx
    from edgeyolo.model import load_model
    from edgeyolo.optimize.measure import model_size

    model = load_model(weights).model
    size = model_size(model)
    onnx = export_onnx(model, out / "onnx" / f"{name.replace(' ', '_')}.onnx", ExportOptions())
    return {"params_M": round(size.params / 1e6, 3), "gflops_640": round(size.gflops, 2),
            "onnx_MB": round(onnx.stat().st_size / 1e6, 2)}


def accuracy(bundle: Path, val: str) -> dict:
    """mAP on the reported set, cached beside the bundle (a rerun only evaluates what is new)."""
    from edgeyolo.datasets import load_dataset
    from edgeyolo.evaluate import evaluate
    from edgeyolo.runtime import load

    cache = bundle.parent / f"{bundle.name}.accuracy.json"
    if cache.exists() and json.loads(cache.read_text()).get("val") == val:
        return json.loads(cache.read_text())["result"]
    result = evaluate(load(bundle), load_dataset(val))
    found = {"mAP50-95": round(result.map50_95 * 100, 2), "mAP50": round(result.map50 * 100, 2)}
    cache.write_text(json.dumps({"val": val, "result": found}))
    return found


def is_arm_row(name: str) -> bool:
    """The INT8-friendliness question: the baseline and the distilled ReLU model."""
    return name == "baseline" or (name.startswith("relu") and "distill" in name)


# The untrained ReLU swap scores every anchor and class above the eval threshold (0.001): its NMS over
# millions of candidates per image runs for many minutes here, for a result of ~0. Timed, not evaluated.
NO_EVAL_ROWS = ("relu swap",)


def row_targets(name: str, args) -> list[str]:
    targets = ["intel-cpu-fp32"] + (["intel-cpu-int8"] if args.int8 else [])
    return targets + (["arm-fp32", "arm-int8"] if args.arm and is_arm_row(name) else [])


def int8_drops(row: dict) -> dict:
    """INT8 accuracy drop (mAP50-95 points) vs the same model's FP32 build, per platform."""
    drops = {}
    for fp32, int8 in (("intel-cpu-fp32", "intel-cpu-int8"), ("arm-fp32", "arm-int8")):
        if fp32 in row.get("accuracy", {}) and int8 in row["accuracy"]:
            drops[int8] = round(row["accuracy"][fp32]["mAP50-95"] - row["accuracy"][int8]["mAP50-95"], 2)
    return drops


def training_facts(weights: Path) -> dict:
    """Wall time, images/s and the held-out mAP of a recovery run (from its folder)."""
    import csv

    run = weights.parent
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"wall_s": int((run / "wall_seconds.txt").read_text()) if (run / "wall_seconds.txt").exists() else None,
            "train_img_per_s": [round(float(r["train_images_per_s"]), 2) for r in rows],
            "hold_mAP50-95": [round(float(r["mAP50-95"]) * 100, 2) for r in rows]}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    tune_train, hold = split_tune(args, out)
    variants = make_variants(args, out, tune_train)
    if args.train or args.train_only:
        variants.update(recovery_variants(args, out, variants, tune_train, hold))
    if args.train_only:
        return
    rows, bundles = {}, {}
    for name, weights in variants.items():
        built, _ = ensure_bundles(str(weights), row_targets(name, args), out / "bundles" / name.replace(" ", "_"),
                                  args.calib, args.calib_size)
        for target, path in built.items():
            if target.startswith("intel"):  # arm bundles run on TFLite's x86 kernels here: accuracy only
                bundles[f"{name} | {target}"] = path
        rows[name] = describe(name, weights, out)
        if weights.parent.joinpath("results.csv").exists():
            rows[name]["training"] = training_facts(weights)
        if args.eval and name not in NO_EVAL_ROWS:  # INT8 accuracy where the drop is the question (time: every evaluation is minutes here)
            rows[name]["accuracy"] = {target: accuracy(path, args.val) for target, path in built.items()
                                      if target == "intel-cpu-fp32" or is_arm_row(name) or args.eval_int8_all}
            rows[name]["int8_drop"] = int8_drops(rows[name])
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    timings = run_interleaved(bundles, args)
    for key, result in timings.items():
        name, target = key.split(" | ")
        rows[name].setdefault("latency", {})[target] = {"inference_ms_p50": result["inference_ms_p50"],
                                                        "end_to_end_ms_p50": result["latency_ms"]["p50"]}
    base = rows["baseline"]["latency"]["intel-cpu-fp32"]["inference_ms_p50"]
    for row in rows.values():
        row["fp32_inference_speedup"] = round(base / row["latency"]["intel-cpu-fp32"]["inference_ms_p50"], 2)
    budget = {"train_data": f"{tune_train} ({len(list((tune_train / 'images').iterdir()))} images of {args.tune})",
              "held_out": f"{hold} (seeded {args.hold_out:.0%}, seed {args.seed}): picks best",
              "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch,
              "optimizer": f"{args.optimizer} lr0 {args.lr0}, linear decay, warm-up {args.warmup_epochs:g} epochs "
                           f"(bias LR from {args.warmup_bias_lr:g}), "
                           "one step per batch",
              "distill": {"temperature": args.temperature, "feature_gain": args.feature_gain},
              "start": f"{start_name(args.recover_from, args.recover_round_to)} "
                       f"(relu row: relu swap{RECONSTRUCTED if 'reconstructed' in args.recover_from else ''})",
              "rows": args.recovery,
              "teacher": args.weights} if args.train else "recovery rows not run (--train)"
    report = {"rows": rows, "round_to": args.round_to, "recovery_budget": budget, "rounds": args.rounds,
              "iters": args.iters, "load_average": os.getloadavg()}
    (out / "compress.json").write_text(json.dumps(report, indent=1))
    (out / "compress.md").write_text(markdown(report))
    print(json.dumps(report, indent=1))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The README table: one row per model, every number from ``report``."""
    def cell(row, *keys, fmt="{}"):
        for key in keys:
            row = row.get(key) if isinstance(row, dict) else None
        return "–" if row is None else fmt.format(row)

    lines = ["| row | params M | GFLOPs | ONNX MB | mAP50-95 | mAP50 | held-out mAP50-95 by epoch | train wall s "
             "| fp32 inference ms | int8 inference ms | end-to-end ms (fp32) | fp32 speed-up | INT8 − FP32 mAP50-95 (intel / arm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        acc = row.get("accuracy", {}).get("intel-cpu-fp32", {})
        drops = row.get("int8_drop", {})
        drop = " / ".join(f"{-drops[k]:+.2f}" for k in ("intel-cpu-int8", "arm-int8") if k in drops) or "–"
        lines.append(" | ".join([
            f"| {name}", str(row["params_M"]), str(row["gflops_640"]), str(row["onnx_MB"]),
            cell(acc, "mAP50-95"), cell(acc, "mAP50"),
            " → ".join(map(str, row.get("training", {}).get("hold_mAP50-95", []))) or "–",
            cell(row, "training", "wall_s"),
            cell(row, "latency", "intel-cpu-fp32", "inference_ms_p50", fmt="{:.1f}"),
            cell(row, "latency", "intel-cpu-int8", "inference_ms_p50", fmt="{:.1f}"),
            cell(row, "latency", "intel-cpu-fp32", "end_to_end_ms_p50", fmt="{:.1f}"),
            f"{row['fp32_inference_speedup']:.2f}×", drop]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
