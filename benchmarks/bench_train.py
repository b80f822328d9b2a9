"""Fine-tune yolov5n on coco-tune-1193, then evaluate ``best`` on coco-val-500 (not part of the test suite).

    python benchmarks/bench_train.py                      # the full recipe: 3 epochs at 640
    python benchmarks/bench_train.py --epochs 1 --limit 200 --skip-eval   # a short speed/memory run

The recipe (the issue's): ``edgeyolo train yolov5n.pt --data coco-tune-1193 --epochs 3
--imgsz 640 --lr0 0.001 --batch 16 --workers 2`` with YOLOv5's default augmentation (mosaic on).
coco-tune-1193 has no val split, so the trainer holds out a seeded 10 % of it to choose ``best``;
coco-val-500 (the reported set) is only used by the final ``edgeyolo eval`` of ``best``.

Reported: mAP50-95 / mAP50 of ``best`` on coco-val-500 (yolov5n starts at 24.48 / 40.82),
training images per second (images trained / seconds spent in the training loop, validation
excluded, from results.csv), and peak memory: the peak of the summed RSS of the training
process and its data-loader workers (sampled every 0.2 s), plus the peak of the main process
alone (``VmHWM``-like, via psutil's samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EDGEYOLO_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(FIXTURES / "weights" / "yolov5n.pt"))
    p.add_argument("--data", default=str(FIXTURES / "coco-tune-1193"))
    p.add_argument("--eval-data", default=str(FIXTURES / "coco-val-500"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr0", type=float, default=0.001)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="Train on the first N images of --data only (a shortened run).")
    p.add_argument("--skip-eval", action="store_true", help="Measure speed and memory only.")
    p.add_argument("--out", default=None, help="Run folder (default: a fresh temporary one).")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def subset(data: Path, limit: int, dest: Path) -> Path:
    """The first ``limit`` images of a YOLO folder, as symlinks (nothing copied)."""
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for image in sorted((data / "images").iterdir())[:limit]:
        (dest / "images" / image.name).symlink_to(image.resolve())
        label = data / "labels" / f"{image.stem}.txt"
        if label.exists():
            (dest / "labels" / label.name).symlink_to(label.resolve())
    return dest


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, float, float]:
    """(exit code, wall seconds, peak tree RSS MB, peak main-process RSS MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    main = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    while proc.poll() is None:
        try:
            procs = [main, *main.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs if p.is_running()]
            peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.2)
    return proc.returncode, time.perf_counter() - start, peak_tree / 2**20, peak_main / 2**20


def main(argv=None) -> None:
    args = parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(Path(args.data), args.limit, Path(tmp) / "subset") if args.limit else Path(args.data)
        run = Path(args.out) if args.out else Path(tmp) / "run"
        train_cmd = [sys.executable, "-m", "edgeyolo.cli", "train", args.weights, "--data", str(data), "-o", str(run),
                     "--epochs", str(args.epochs), "--imgsz", str(args.imgsz), "--batch", str(args.batch),
                     "--workers", str(args.workers), "--lr0", str(args.lr0), "--device", args.device]
        print("$", " ".join(train_cmd), file=sys.stderr)
        code, wall, peak_tree, peak_main = run_measured(train_cmd, env)
        if code:
            sys.exit(f"training failed with exit status {code}")
        with (run / "results.csv").open() as f:
            rows = list(csv.DictReader(f))
        train_seconds = sum(float(r["epoch_seconds"]) for r in rows)
        report = {
            "recipe": " ".join(train_cmd[3:]), "limit": args.limit, "epochs": len(rows),
            "train_images_per_s": [round(float(r["train_images_per_s"]), 3) for r in rows],
            "epoch_seconds_incl_val": round(train_seconds, 1), "wall_seconds": round(wall, 1),
            "peak_rss_tree_mb": round(peak_tree), "peak_rss_main_mb": round(peak_main),
            "val_split_map50_95": [round(float(r["mAP50-95"]) * 100, 2) for r in rows],
        }
        if not args.skip_eval:
            out = subprocess.run([sys.executable, "-m", "edgeyolo.cli", "eval", str(run / "best.safetensors"),
                                  "--data", args.eval_data, "--json"], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"eval failed: {out.stderr.strip()}")
            result = json.loads(out.stdout)
            report["coco_val_500"] = {"map50_95": round(result["map50_95"] * 100, 2),
                                      "map50": round(result["map50"] * 100, 2), "start": [24.48, 40.82]}
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
