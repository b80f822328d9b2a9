"""Throughput of one Detector shared by 2 threads vs 1 thread, interleaved rounds (ratios, not absolutes).

    PYTHONPATH=$PWD python benchmarks/bench_threads.py BUNDLE [BUNDLE ...] --rounds 5 --images 16

Each round times the same images once on 1 thread and once split over 2 threads sharing the
Detector, in alternating order, so load from other processes hits both alike; the median
ratio of the rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import FIXTURES


def throughput(detector, frames, threads: int) -> float:
    start = time.perf_counter()
    if threads == 1:
        for frame in frames:
            detector.detect(frame)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(detector.detect, frames))
    return len(frames) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--images", type=int, default=16, help="coco128 images per timing")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from edgeyolo.runtime import load, read_image

    frames = [read_image(p) for p in sorted((FIXTURES / "coco128" / "images").glob("*.jpg"))[:args.images]]
    for bundle in args.bundles:
        detector = load(bundle)
        for frame in frames[:3]:
            detector.detect(frame)
        one, two = [], []
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for threads in order:
                (one if threads == 1 else two).append(throughput(detector, frames, threads))
        ratios = [b / a for a, b in zip(one, two)]
        print(f"{Path(bundle).name:>18}: 1 thread {statistics.median(one):6.1f} img/s, 2 threads sharing one Detector "
              f"{statistics.median(two):6.1f} img/s, ratio {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}; engine threads {detector.info.get('threads')})",
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
