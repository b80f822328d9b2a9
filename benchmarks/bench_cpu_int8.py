"""cpu-int8 (Q/DQ ONNX) vs cpu-fp32 on ONNX Runtime CPU: end-to-end FPS, alternately in one run.

    python benchmarks/bench_cpu_int8.py [--rounds 10 --iters 20 --threads N] [--json]

Builds cpu-fp32 and cpu-int8 (calibrated on --calib) into --out, reusing bundles already
there, then times ``Detector.detect`` (letterbox → ONNX Runtime → decode → NMS) with
``edgeyolo.bench.benchmark`` in interleaved rounds (fp32, int8, fp32, int8, ...), so a change
in the machine's load during the run hits both alike. The ratio is the figure to read; the
absolute FPS belong to this machine and its load.
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
TARGETS = ("cpu-fp32", "cpu-int8")


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "cpu-int8")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads [default: the target's].")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


def ensure_bundles(args) -> dict[str, Path]:
    from edgeyolo.build import build_bundle, prepare_calibration
    from edgeyolo.bundle import is_bundle
    from edgeyolo.targets import load_target

    bundles = {}
    for name in TARGETS:
        path = Path(args.out) / name
        if not is_bundle(path):
            target = load_target(name)
            start = time.perf_counter()
            calibration = (prepare_calibration(args.weights, target, args.calib, args.calib_size)
                           if target.needs_calibration else None)
            build_bundle(args.weights, target, path, calibration=calibration)
            print(f"built {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        bundles[name] = path
    return bundles


def run_interleaved(bundles: dict[str, Path], args) -> dict[str, dict]:
    from edgeyolo.bench import benchmark
    from edgeyolo.runtime import load, read_image

    images = [read_image(p) for p in sorted(Path(args.images).iterdir())
              if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    options = {"threads": args.threads} if args.threads is not None else {}
    detectors = {name: load(path, **options) for name, path in bundles.items()}
    for detector in detectors.values():
        for i in range(args.warmup):
            detector.detect(images[i % len(images)])
    rounds = {name: [] for name in detectors}
    for _ in range(args.rounds):
        for name, detector in detectors.items():
            rounds[name].append(benchmark(detector, images, iters=args.iters, warmup=0).to_dict())
    return {name: summarise(detectors[name].info, rounds[name]) for name in detectors}


def summarise(info: dict, rounds: list[dict]) -> dict:
    """FPS pooled over every round; the per-stage p50 as the median of the rounds' own."""
    seconds = sum(r["iters"] / r["fps"] for r in rounds)
    iters = sum(r["iters"] for r in rounds)

    def median_p50(stage=None):
        return round(float(np.median([(r["stages_ms"][stage] if stage else r["latency_ms"])["p50"] for r in rounds])), 2)

    return {"threads": info.get("threads"), "fps": round(iters / seconds, 2),
            "fps_per_round": [r["fps"] for r in rounds], "latency_ms_p50": median_p50(),
            "inference_ms_p50": median_p50("inference"), "iters": iters}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run_interleaved(ensure_bundles(args), args)
    ratio = round(results["cpu-int8"]["fps"] / results["cpu-fp32"]["fps"], 3)
    report = {"results": results, "int8_over_fp32_fps": ratio, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'target':<10}{'FPS':>8}{'e2e p50 ms':>12}{'infer p50 ms':>14}  threads")
    for name, r in results.items():
        print(f"{name:<10}{r['fps']:>8.2f}{r['latency_ms_p50']:>12.2f}{r['inference_ms_p50']:>14.2f}  {r['threads']}")
    print(f"cpu-int8 / cpu-fp32 end-to-end FPS: {ratio:.2f}x "
          f"(load average {report['load_average_1min']}: other processes share this CPU)")


if __name__ == "__main__":
    main()
