"""TFLite full-integer INT8 vs FP32 on LiteRT/XNNPACK, built and benchmarked alternately in one run.

    python benchmarks/bench_tflite.py [--rounds 10 --iters 20 --threads N] [--json]

Builds arm-fp32 and arm-int8 (calibrated on --calib) into --out (reused when already there;
the conversion time of each build is printed), then times ``Detector.detect`` end to end with
``edgeyolo.bench.benchmark`` in interleaved rounds (fp32, int8, fp32, int8, ...), so drift in
the machine's load hits both engines alike.

This runs LiteRT's XNNPACK kernels on the machine at hand. On an x86 workstation that stands in
for an ARM board: the same kernels, but x86 SIMD, so absolute FPS and even the INT8/FP32 ratio
will differ on a Raspberry Pi or a phone. Measure there for numbers that matter.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import target_bench_parser  # beside this script
TARGETS = ("arm-fp32", "arm-int8")


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "arm-int8")
    parser.add_argument("--threads", type=int, help="LiteRT threads [default: the target's, 0 = every core].")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


def ensure_bundles(args) -> tuple[dict[str, Path], dict[str, dict]]:
    """Each target's bundle in ``args.out``, built unless already there; build and conversion seconds."""
    from edgeyolo.build import build_bundle, prepare_calibration
    from edgeyolo.bundle import is_bundle, load_bundle
    from edgeyolo.targets import load_target

    bundles, builds = {}, {}
    for name in TARGETS:
        path = Path(args.out) / name
        if not is_bundle(path):
            target = load_target(name)
            start = time.perf_counter()
            calibration = (prepare_calibration(args.weights, target, args.calib, args.calib_size)
                           if target.needs_calibration else None)
            build_bundle(args.weights, target, path, calibration=calibration)
            builds[name] = {"build_s": round(time.perf_counter() - start, 1)}
            print(f"built {path} in {builds[name]['build_s']} s", file=sys.stderr)
        builds.setdefault(name, {})["conversion_s"] = load_bundle(path).manifest["backend"].get("conversion_seconds")
        bundles[name] = path
    return bundles, builds


def run_interleaved(bundles: dict[str, Path], args) -> dict[str, dict]:
    from edgeyolo.bench import benchmark
    from edgeyolo.runtime import load, read_image

    image_paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [read_image(p) for p in image_paths]
    options = {"threads": args.threads} if args.threads is not None else {}
    detectors = {name: load(path, **options) for name, path in bundles.items()}
    for detector in detectors.values():
        for i in range(args.warmup):
            detector.detect(images[i % len(images)])
    rounds = {name: [] for name in detectors}
    for _ in range(args.rounds):
        for name, detector in detectors.items():  # strictly one engine at a time
            rounds[name].append(benchmark(detector, images, iters=args.iters, warmup=0).to_dict())
    return {name: summarise(detectors[name].info, rounds[name]) for name in detectors}


def summarise(info: dict, rounds: list[dict]) -> dict:
    """Pooled FPS over every round; latency percentiles as the median of the rounds' own percentiles."""
    seconds = sum(r["iters"] / r["fps"] for r in rounds)
    iters = sum(r["iters"] for r in rounds)

    def median_of(key, stage=None):
        return round(float(np.median([(r["stages_ms"][stage] if stage else r["latency_ms"])[key] for r in rounds])), 2)

    return {"info": info, "fps": round(iters / seconds, 2), "fps_per_round": [r["fps"] for r in rounds],
            "latency_ms": {k: median_of(k) for k in ("p50", "p90", "p99")},
            "inference_ms_p50": median_of("p50", "inference"), "iters": iters}


def int8_over_fp32(results: dict[str, dict]) -> float:
    return round(results["arm-int8"]["fps"] / results["arm-fp32"]["fps"], 3)


def print_table(results: dict[str, dict], builds: dict[str, dict]) -> None:
    print(f"{'target':<10}{'FPS':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'infer p50':>11}  threads  io")
    for name, r in results.items():
        info = r["info"]
        print(f"{name:<10}{r['fps']:>8.1f}{r['latency_ms']['p50']:>9.2f}{r['latency_ms']['p90']:>9.2f}"
              f"{r['latency_ms']['p99']:>9.2f}{r['inference_ms_p50']:>11.2f}  {info.get('threads'):>7}  "
              f"{info.get('input_dtype')}")
    print(f"INT8/FP32 end-to-end FPS: {int8_over_fp32(results):.2f}x "
          f"(LiteRT XNNPACK on {platform.machine()}, standing in for ARM)")
    for name, b in builds.items():
        built = f"build {b['build_s']} s, " if "build_s" in b else ""
        print(f"{name}: {built}conversion {b['conversion_s']} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    bundles, builds = ensure_bundles(args)
    results = run_interleaved(bundles, args)
    if args.json:
        print(json.dumps({"results": results, "int8_over_fp32": int8_over_fp32(results), "builds": builds,
                          "machine": platform.machine(), "cpu_count": os.cpu_count(),
                          "load_average": os.getloadavg()}, indent=2))
    else:
        print_table(results, builds)
        print(f"load average: {os.getloadavg()[0]:.2f} (1 min; other processes share this CPU)")


if __name__ == "__main__":
    main()
