"""In-engine preprocessing vs host preprocessing: the same model, uint8-input bundle vs float-input bundle.

    PYTHONPATH=$PWD python benchmarks/bench_image_input.py UINT8_BUNDLE FLOAT_BUNDLE [UINT8 FLOAT ...]
        [--rounds 10] [--iters 20]

Pairs of bundles of one target, one built with the default ``uint8_input`` (the engine takes
the BGR uint8 letterbox) and one with ``uint8_input = false`` (or by an earlier edgeyolo):
both run by this runtime in one process, alternating round by round, on coco128 images held
in memory. Prints per-frame ms of ``to_input`` + ``inference`` (what the option moves) and of
the whole ``detect``, medians of the rounds, and the largest box difference seen.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from bench_common import FIXTURES


def one_round(detector, images, iters) -> tuple[float, float]:
    moved, total = 0.0, 0.0
    for i in range(iters):
        start = time.perf_counter()
        detector.detect(images[i % len(images)])
        total += time.perf_counter() - start
        moved += detector.last_times.to_input + detector.last_times.inference
    return 1000 * moved / iters, 1000 * total / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", help="UINT8_BUNDLE FLOAT_BUNDLE pairs")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if len(args.bundles) % 2:
        parser.error("bundles come in pairs: UINT8_BUNDLE FLOAT_BUNDLE")
    from edgeyolo.runtime import load, read_image

    images = [read_image(p) for p in sorted((FIXTURES / "coco128" / "images").glob("*.jpg"))[:20]]
    print(f"{'target':<16} {'to_input+inference ms float→uint8':>34} {'detect ms float→uint8':>22} "
          f"{'ratio':>6} {'max box diff px':>16}")
    for image_bundle, float_bundle in zip(args.bundles[::2], args.bundles[1::2]):
        pair = {"uint8": load(image_bundle), "float": load(float_bundle)}
        assert pair["uint8"].takes_image and not pair["float"].takes_image
        diff = 0.0
        for image in images[:5]:
            a, b = (pair[k].detect(image) for k in ("uint8", "float"))
            if len(a) == len(b) and len(a):
                diff = max(diff, float(np.abs(a.xyxy - b.xyxy).max()))
        moved = {k: [] for k in pair}
        total = {k: [] for k in pair}
        for r in range(args.rounds):
            for kind in (("uint8", "float") if r % 2 else ("float", "uint8")):
                m, t = one_round(pair[kind], images, args.iters)
                moved[kind].append(m)
                total[kind].append(t)
        med = {k: (statistics.median(moved[k]), statistics.median(total[k])) for k in pair}
        ratio = statistics.median(f / u for f, u in zip(total["float"], total["uint8"]))
        print(f"{pair['uint8'].info['target']:<16} {med['float'][0]:>16.2f} → {med['uint8'][0]:<15.2f} "
              f"{med['float'][1]:>10.2f} → {med['uint8'][1]:<9.2f} {ratio:>5.2f}x {diff:>16.3f}")


if __name__ == "__main__":
    main()
