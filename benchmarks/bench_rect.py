"""Square vs rectangular (384x640) engines on 16:9 frames: detect() FPS, alternating rounds (ratios, not absolutes).

    PYTHONPATH=$PWD python benchmarks/bench_rect.py SQUARE RECT [SQUARE RECT ...] --images 20 --rounds 5 --iters 40

Frames are coco128 images resized (stretched) to 1280x720, as a 16:9 camera gives them, held
in memory (no decode). Each round times every bundle in turn over the same frames, so load
from other processes hits them alike; FPS medians and the median per-round ratio of each
pair (RECT over SQUARE) are printed, with how many detections (score >= 0.25) each found.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
from bench_common import FIXTURES


def fps(detector, frames, iters: int) -> tuple[float, int]:
    start, found = time.perf_counter(), 0
    for i in range(iters):
        found += len(detector.detect(frames[i % len(frames)]))
    return iters / (time.perf_counter() - start), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", help="pairs: square bundle, then its rectangular twin")
    parser.add_argument("--images", type=int, default=20, help="coco128 images, resized to 1280x720")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40, help="timed detect() calls per bundle per round")
    args = parser.parse_args()
    if len(args.bundles) % 2:
        parser.error("give bundles in pairs: SQUARE RECT")
    from edgeyolo.runtime import load

    paths = sorted((FIXTURES / "coco128" / "images").glob("*.jpg"))[:args.images]
    frames = [cv2.resize(cv2.imread(str(p)), (1280, 720), interpolation=cv2.INTER_LINEAR) for p in paths]
    detectors = [load(b) for b in args.bundles]
    for d in detectors:
        fps(d, frames, 5)  # warm-up
    runs = [[] for _ in detectors]
    found = [0] * len(detectors)
    for r in range(args.rounds):
        order = range(len(detectors)) if r % 2 == 0 else reversed(range(len(detectors)))
        for i in order:
            speed, n = fps(detectors[i], frames, args.iters)
            runs[i].append(speed)
            found[i] = n
    print(f"{len(frames)} coco128 images at 1280x720, {args.rounds} alternating rounds of {args.iters} frames")
    print(f"{'bundle':<28} {'input':>9} {'FPS':>7} {'ratio':>7} {'dets/round':>11}")
    for i, d in enumerate(detectors):
        h, w = d.letterbox.imgsz
        ratio = "" if i % 2 == 0 else f"{statistics.median(a / b for a, b in zip(runs[i], runs[i - 1])):.2f}x"
        print(f"{d.info['target']:<28} {f'{h}x{w}':>9} {statistics.median(runs[i]):>7.1f} {ratio:>7} {found[i]:>11}")


if __name__ == "__main__":
    main()
