"""OpenVINO's performance hints for a stream: CPU time and FPS per inference, engine only.

    PYTHONPATH=$PWD python benchmarks/bench_ov_hints.py BUNDLE [BUNDLE ...] [--iters 60] [--rounds 2]

For each OpenVINO bundle, the IR is compiled with the LATENCY hint (1 stream, every core) and
the THROUGHPUT hint (here 2 streams of 1 thread), and ``--requests`` infer requests are kept
busy on one fixed letterboxed frame (no host work). It prints FPS and the process's CPU time
per inference (every thread): FPS says how fast on this machine now, CPU time per frame how
much of the cores an inference costs, which is what a stream that overlaps host work with
inference pays per frame and what other jobs on a shared machine distort least. The hints
alternate, round after round. ``Engine.async_queue`` uses the winner (``STREAM_HINT``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(engine, hint: str, requests: int, iters: int, batch: np.ndarray) -> tuple[float, float]:
    """(FPS, CPU ms per inference) of ``requests`` requests kept busy on ``batch``."""
    import openvino as ov

    compiled = engine.compiled_for(hint)
    queue = ov.AsyncInferQueue(compiled, requests)
    for _ in range(2 * requests):  # warm-up
        queue.start_async({0: batch})
    queue.wait_all()
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(iters):
        queue.start_async({0: batch})
    queue.wait_all()
    return iters / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2)
    args = parser.parse_args()

    from edgeyolo.runtime import load

    for path in args.bundles:
        detector = load(path)
        spec = detector.bundle.manifest["input"]
        batch = np.random.default_rng(0).integers(0, 256, spec["shape"]).astype(spec.get("dtype", "float32"))
        if batch.dtype != np.uint8:
            batch /= 255
        runs = {"LATENCY": [], "THROUGHPUT": []}
        for r in range(args.rounds):
            for hint in (runs if r % 2 == 0 else list(runs)[::-1]):
                runs[hint].append(measure(detector.engine, hint, args.requests, args.iters, batch))
        for hint, values in runs.items():
            compiled = detector.engine.compiled_for(hint)
            print(f"{detector.bundle.target['name']:<22} {hint:<10} {int(compiled.get_property('NUM_STREAMS'))} "
                  f"stream(s), {int(compiled.get_property('INFERENCE_NUM_THREADS'))} threads in all: "
                  f"{statistics.median(v[0] for v in values):6.1f} FPS "
                  f"{statistics.median(v[1] for v in values):6.2f} CPU ms/inference")


if __name__ == "__main__":
    main()
