"""Compression rows side by side: baseline, zeroing, structured pruning (+ recovery), ReLU + distillation.

Each row: params, GFLOPs@640, ONNX size, mAP50-95/mAP50 on coco-val-500 (--eval), and
intel-cpu-fp32 (+ intel-cpu-int8 with --int8) inference / end-to-end latency, every engine
measured alternately in one process (round after round) so machine load hits all rows alike.
Recovery rows (--train) train only on coco-tune-1193 with the stated budget; never on the
evaluation set.

    PYTHONPATH=$PWD python benchmarks/bench_compress.py --out runs/compress [--eval] [--int8] [--train]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import FIXTURES, ensure_bundles, run_interleaved, target_bench_parser  # noqa: E402


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "intel-cpu-int8")
    parser.set_defaults(out="runs/compress", rounds=5, iters=10, warmup=5)
    parser.add_argument("--threads", type=int, help="Inference threads [default: the backend's].")
    parser.add_argument("--eval", action="store_true", help="mAP on coco-val-500 for every row (slow on 2 cores).")
    parser.add_argument("--val", default=str(FIXTURES / "coco-val-500"))
    parser.add_argument("--int8", action="store_true", help="Also build and time intel-cpu-int8 bundles.")
    parser.add_argument("--train", action="store_true", help="Also the recovery rows (fine-tune / distill).")
    parser.add_argument("--tune", default=str(FIXTURES / "coco-tune-1193"), help="Training data for recovery.")
    parser.add_argument("--train-images", type=int, default=300, help="Recovery budget: first N tune images.")
    parser.add_argument("--epochs", type=int, default=2, help="Recovery budget: epochs.")
    parser.add_argument("--lr0", type=float, default=0.001, help="Recovery budget: AdamW LR (no warm-up).")
    parser.add_argument("--round-to", type=int, default=16,
                        help="Channel multiple of the pruned rows (16 = one AVX-512 fp32 block).")
    parser.add_argument("--imgsz", type=int, default=320, help="Recovery budget: training image size.")
    parser.add_argument("--batch", type=int, default=16)
    return parser.parse_args(argv)


def make_variants(args, out: Path) -> dict[str, Path]:
    """Checkpoints of the rows that need no training (pruning is deterministic and fast)."""
    from edgeyolo.model import load_model, save_model
    from edgeyolo.optimize.measure import model_size
    from edgeyolo.optimize.prune import prune
    from edgeyolo.optimize.zeroing import zero_smallest

    base = load_model(args.weights).model
    gflops = model_size(base).gflops
    variants = {"baseline": Path(args.weights)}
    r = args.round_to
    specs = {"zeroing-30%": lambda m: zero_smallest(m, 0.3),
             "pruned-30%-gflops": lambda m: prune(m, target_gflops=0.7 * gflops, round_to=r).model,
             "pruned-50%-gflops": lambda m: prune(m, target_gflops=0.5 * gflops, round_to=r).model,
             "pruned-50%-gflops round-to-8": lambda m: prune(m, target_gflops=0.5 * gflops, round_to=8).model}
    for name, make in specs.items():
        path = out / "weights" / f"{name.replace(' ', '_')}-r{r}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(make(copy.deepcopy(base)), path)
        variants[name] = path
    return variants


def recovery_variants(args, out: Path, variants: dict[str, Path]) -> dict[str, Path]:
    """Fine-tune / distil the 30%-GFLOPs model, and a ReLU baseline, at one stated budget."""
    from edgeyolo.optimize.distill_trainer import DistillTrainer
    from edgeyolo.train.hyp import load_hyp
    from edgeyolo.train.trainer import TrainConfig, Trainer

    start = str(variants["pruned-30%-gflops"])
    tune = tune_subset(Path(args.tune), args.train_images, out / f"tune-{args.train_images}")
    runs = {
        "pruned-30% + fine-tune": lambda c: Trainer(c),
        "pruned-30% + distill (label-free)": lambda c: DistillTrainer(c, args.weights, label_free=True),
        "pruned-30% + distill + labels": lambda c: DistillTrainer(c, args.weights),
        "relu + distill + labels": lambda c: DistillTrainer(c, args.weights, act="relu"),
    }
    found = {}
    for name, make in runs.items():
        run = out / "runs" / name.replace(" ", "").replace("+", "_").replace("(", "").replace(")", "")
        if not (run / "best.safetensors").exists():
            weights = args.weights if name.startswith("relu") else start
            data = str(tune / "images") if "label-free" in name else str(tune)
            config = TrainConfig(weights=weights, data=data, out=str(run), epochs=args.epochs, imgsz=args.imgsz,
                                 batch=args.batch, hyp=load_hyp(None, {"lr0": args.lr0, "warmup_epochs": 0}),
                                 optimizer="adamw", workers=1, command=f"bench_compress {name}")
            make(config).train()
        found[name] = run / "best.safetensors"
    return found


def tune_subset(tune: Path, count: int, folder: Path) -> Path:
    """The first ``count`` tune images (sorted) and their labels, linked into ``folder``."""
    images = sorted((tune / "images").glob("*.jpg"))[:count]
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image in images:
        label = tune / "labels" / f"{image.stem}.txt"
        for src, dst in ((image, folder / "images" / image.name), (label, folder / "labels" / label.name)):
            if src.exists() and not dst.exists():
                dst.symlink_to(src.resolve())
    return folder


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
    from edgeyolo.datasets import load_dataset
    from edgeyolo.evaluate import evaluate
    from edgeyolo.runtime import load

    result = evaluate(load(bundle), load_dataset(val))
    return {"mAP50-95": round(result.map50_95 * 100, 2), "mAP50": round(result.map50 * 100, 2)}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    variants = make_variants(args, out)
    if args.train:
        variants.update(recovery_variants(args, out, variants))
    targets = ["intel-cpu-fp32"] + (["intel-cpu-int8"] if args.int8 else [])
    rows, bundles = {}, {}
    for name, weights in variants.items():
        built, _ = ensure_bundles(str(weights), targets, out / "bundles" / name.replace(" ", "_"), args.calib,
                                  args.calib_size)
        for target, path in built.items():
            bundles[f"{name} | {target}"] = path
        rows[name] = describe(name, weights, out)
        if args.eval:
            for target, path in built.items():
                rows[name][target] = accuracy(path, args.val)
    timings = run_interleaved(bundles, args)
    for key, result in timings.items():
        name, target = key.split(" | ")
        rows[name].setdefault("latency", {})[target] = {"inference_ms_p50": result["inference_ms_p50"],
                                                        "end_to_end_ms_p50": result["latency_ms"]["p50"]}
    base = rows["baseline"]["latency"]["intel-cpu-fp32"]["inference_ms_p50"]
    for row in rows.values():
        row["fp32_inference_speedup"] = round(base / row["latency"]["intel-cpu-fp32"]["inference_ms_p50"], 2)
    budget = {"train_data": f"first {args.train_images} images of {args.tune}", "epochs": args.epochs,
              "imgsz": args.imgsz, "batch": args.batch, "optimizer": f"adamw lr0 {args.lr0}, no warm-up",
              "start": "pruned-30%-gflops (relu row: baseline)", "teacher": args.weights} \
        if args.train else "recovery rows not run (--train)"
    report = {"rows": rows, "round_to": args.round_to, "recovery_budget": budget, "rounds": args.rounds, "iters": args.iters}
    (out / "compress.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
