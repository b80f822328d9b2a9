"""Detector.stream vs detect() one by one on images read from disk, alternating rounds (ratios, not absolutes).

    PYTHONPATH=$PWD python benchmarks/bench_stream.py BUNDLE [BUNDLE ...] --images 100 --rounds 4 --depth 3

Each round reads the same coco128 image paths from disk (decode included, as ``detect`` on a
folder does) once synchronously and once through ``Detector.stream``, in alternating order,
so load from other processes hits both alike; FPS medians and the median per-round ratio are
printed. Results are checked identical too.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_common import FIXTURES


def sync_fps(detector, paths) -> tuple[float, list]:
    detector.detect(paths[0])  # untimed: OpenVINO holds one compiled model and recompiles on a mode switch
    start = time.perf_counter()
    out = [detector.detect(path) for path in paths]
    return len(paths) / (time.perf_counter() - start), out


def stream_fps(detector, paths, depth: int) -> tuple[float, list]:
    list(detector.stream(paths[:1], depth=depth))  # untimed, as in sync_fps
    start = time.perf_counter()
    out = list(detector.stream(paths, depth=depth))
    return len(paths) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--images", type=int, default=100, help="coco128 images per timing")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    from edgeyolo.runtime import load

    paths = [str(p) for p in sorted((FIXTURES / "coco128" / "images").glob("*.jpg"))[:args.images]]
    print(f"{len(paths)} images from disk, {args.rounds} alternating rounds, stream depth {args.depth}")
    print(f"{'bundle':<28} {'sync FPS':>9} {'stream FPS':>11} {'ratio':>7}")
    for bundle in args.bundles:
        detector = load(bundle)
        detector.detect(paths[0])  # warm-up
        sync, stream, ratios = [], [], []
        for r in range(args.rounds):
            if r % 2:
                b, got = stream_fps(detector, paths, args.depth)
                a, ref = sync_fps(detector, paths)
            else:
                a, ref = sync_fps(detector, paths)
                b, got = stream_fps(detector, paths, args.depth)
            assert all((x.xyxy == y.xyxy).all() and (x.class_id == y.class_id).all() for x, y in zip(ref, got))
            sync.append(a)
            stream.append(b)
            ratios.append(b / a)
        print(f"{detector.info['target']:<28} {statistics.median(sync):>9.1f} {statistics.median(stream):>11.1f} "
              f"{statistics.median(ratios):>6.2f}x")


if __name__ == "__main__":
    main()
