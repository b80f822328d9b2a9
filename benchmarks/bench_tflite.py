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
from pathlib import Path

from bench_common import ensure_bundles, run_interleaved, target_bench_parser  # beside this script

TARGETS = ("arm-fp32", "arm-int8")


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "arm-int8")
    parser.add_argument("--threads", type=int, help="LiteRT threads [default: the target's, 0 = every core].")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


def conversion_facts(bundles: dict[str, Path], build_seconds: dict[str, float]) -> dict[str, dict]:
    """Build seconds (where built now) and the converter's own seconds from each manifest."""
    from edgeyolo.bundle import load_bundle

    builds = {}
    for name, path in bundles.items():
        builds[name] = {"build_s": build_seconds[name]} if name in build_seconds else {}
        builds[name]["conversion_s"] = load_bundle(path).manifest["backend"].get("conversion_seconds")
    return builds


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
    bundles, build_seconds = ensure_bundles(args.weights, TARGETS, args.out, args.calib, args.calib_size)
    builds = conversion_facts(bundles, build_seconds)
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
