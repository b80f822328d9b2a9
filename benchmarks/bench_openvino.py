"""OpenVINO INT8 vs FP32 (and ONNX Runtime FP32) on this CPU, benchmarked alternately in one run.

    python benchmarks/bench_openvino.py [--rounds 10 --iters 20] [--json]

Builds intel-cpu-fp32, intel-cpu-int8 (calibrated on --calib) and cpu-fp32 into --out
(reused when already there), then times ``Detector.detect`` end to end with
``edgeyolo.bench.benchmark`` in interleaved rounds (fp32, int8, ort, fp32, int8, ...),
so drift in the machine's load hits every engine alike.

Memory: peak RSS is per process, so each engine runs in its own freshly started worker
process. Reported are the worker's peak RSS (``VmHWM``, which starts afresh at exec;
``getrusage``'s maximum would still count the parent's pages, torch included, from
before the worker's exec) and the growth from loading and running the engine (peak minus
the RSS before ``load``, which already includes numpy, OpenCV and the backend's library).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

from bench_common import ensure_bundles, target_bench_parser  # beside this script

TARGETS = ("intel-cpu-fp32", "intel-cpu-int8", "cpu-fp32")


def parse_args(argv=None):
    parser = target_bench_parser(__doc__, "intel-cpu-int8")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS),
                        help="Targets (names or .toml paths) to build and time [default: %(default)s].")
    parser.add_argument("--threads", type=int, help="Engine threads [default: each backend's choice].")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- building
# --------------------------------------------------------------------------- one worker per engine
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS since it was exec'd (Linux ``VmHWM``; elsewhere ``getrusage``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    from edgeyolo.bench import peak_rss_mb as rusage_peak

    return rusage_peak()


def worker(conn, bundle: str, image_paths: list[str], threads, warmup: int) -> None:
    """Load one engine, warm it, then run ``benchmark`` rounds on request until told to stop."""
    from edgeyolo.bench import benchmark
    from edgeyolo.runtime import load, read_image

    images = [read_image(p) for p in image_paths]
    before = rss_mb()
    detector = load(bundle, **({"threads": threads} if threads is not None else {}))
    for i in range(warmup):
        detector.detect(images[i % len(images)])
    conn.send({"info": detector.info})
    while (iters := conn.recv()) is not None:
        result = benchmark(detector, images, iters=iters, warmup=0)
        conn.send({"round": result.to_dict(), "rss_before_load_mb": round(before, 1), "peak_rss_mb": peak_rss_mb()})
    conn.close()


def run_interleaved(bundles: dict[str, Path], args) -> dict[str, dict]:
    image_paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ctx = mp.get_context("spawn")
    workers = {}
    for name, path in bundles.items():  # start one at a time, so loading does not compete
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, str(path), image_paths, args.threads, args.warmup))
        proc.start()
        workers[name] = (proc, parent, parent.recv()["info"])
    rounds = {name: [] for name in bundles}
    try:
        for _ in range(args.rounds):
            for name, (_, conn, _) in workers.items():  # strictly one engine at a time
                conn.send(args.iters)
                rounds[name].append(conn.recv())
    finally:
        for proc, conn, _ in workers.values():
            conn.send(None)
            proc.join(timeout=30)
    return {name: summarise(workers[name][2], rounds[name]) for name in bundles}


def summarise(info: dict, rounds: list[dict]) -> dict:
    """Pooled FPS over every round; latency percentiles as the median of the rounds' own percentiles."""
    import numpy as np

    seconds = sum(r["round"]["iters"] / r["round"]["fps"] for r in rounds)
    iters = sum(r["round"]["iters"] for r in rounds)

    def median_of(key, stage=None):
        source = (lambda r: r["round"]["stages_ms"][stage]) if stage else (lambda r: r["round"]["latency_ms"])
        return round(float(np.median([source(r)[key] for r in rounds])), 2)

    last = rounds[-1]
    return {
        "info": info,
        "fps": round(iters / seconds, 2),
        "fps_per_round": [r["round"]["fps"] for r in rounds],
        "latency_ms": {k: median_of(k) for k in ("p50", "p90", "p99")},
        "inference_ms_p50": median_of("p50", "inference"),
        "peak_rss_mb": last["peak_rss_mb"],
        "engine_rss_growth_mb": round(last["peak_rss_mb"] - last["rss_before_load_mb"], 1),
        "iters": iters,
    }


# --------------------------------------------------------------------------- report
def print_table(results: dict[str, dict], build_seconds: dict) -> None:
    width = max(len(name) for name in results) + 2
    print(f"{'target':<{width}}{'FPS':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'infer p50':>11}"
          f"{'peak RSS MB':>13}{'engine MB':>11}  threads/precision")
    for name, r in results.items():
        info = r["info"]
        detail = f"{info.get('threads')}/{info.get('inference_precision', 'f32')}"
        print(f"{name:<{width}}{r['fps']:>8.1f}{r['latency_ms']['p50']:>9.2f}{r['latency_ms']['p90']:>9.2f}"
              f"{r['latency_ms']['p99']:>9.2f}{r['inference_ms_p50']:>11.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['engine_rss_growth_mb']:>11.0f}  {detail}")
    for key, ratio in comparisons(results).items():
        a, b = RATIOS[key]
        print(f"FPS {a} / {b}: {ratio:.2f}x")
    for name, seconds in build_seconds.items():
        print(f"build {name}: {seconds} s")


RATIOS = {"int8_over_fp32": ("intel-cpu-int8", "intel-cpu-fp32"),
          "ov_fp32_over_ort_fp32": ("intel-cpu-fp32", "cpu-fp32")}


def comparisons(results: dict[str, dict]) -> dict:
    """FPS ratios of the pairs the issue asks about, where both were timed."""
    fps = {name: r["fps"] for name, r in results.items()}
    return {key: round(fps[a] / fps[b], 3) for key, (a, b) in RATIOS.items() if a in fps and b in fps}


def main(argv=None) -> None:
    args = parse_args(argv)
    bundles, build_seconds = ensure_bundles(args.weights, args.targets, args.out, args.calib, args.calib_size)
    load_before = os.getloadavg()[0]
    results = run_interleaved(bundles, args)
    load_after = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"results": results, "ratios": comparisons(results), "build_seconds": build_seconds,
                          "cpu_count": os.cpu_count(), "load_average_1min": [load_before, load_after]}, indent=2))
    else:
        print_table(results, build_seconds)
        print(f"{os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
              "(this run adds about one per engine thread; the rest is other processes competing for the CPU)")


if __name__ == "__main__":
    main()
