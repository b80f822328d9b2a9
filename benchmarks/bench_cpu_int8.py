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

from bench_common import ensure_bundles, run_interleaved, target_bench_parser  # beside this script

TARGETS = ("cpu-fp32", "cpu-int8")


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "cpu-int8")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads [default: the target's].")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    bundles, _ = ensure_bundles(args.weights, TARGETS, args.out, args.calib, args.calib_size)
    results = run_interleaved(bundles, args)
    ratio = round(results["cpu-int8"]["fps"] / results["cpu-fp32"]["fps"], 3)
    report = {"results": results, "int8_over_fp32_fps": ratio, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'target':<10}{'FPS':>8}{'e2e p50 ms':>12}{'infer p50 ms':>14}  threads")
    for name, r in results.items():
        print(f"{name:<10}{r['fps']:>8.2f}{r['latency_ms']['p50']:>12.2f}{r['inference_ms_p50']:>14.2f}  "
              f"{r['info'].get('threads')}")
    print(f"cpu-int8 / cpu-fp32 end-to-end FPS: {ratio:.2f}x "
          f"(load average {report['load_average_1min']}: other processes share this CPU)")


if __name__ == "__main__":
    main()
