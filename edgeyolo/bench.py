"""Latency, throughput and memory of a ``Detector``, end to end and per stage."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .runtime.detector import StageTimes


@dataclass
class BenchResult:
    fps: float
    latency_ms: dict
    stages_ms: dict
    peak_rss_mb: float
    iters: int
    warmup: int
    backend: str
    threads: int | str | None
    target: str
    input_shape: list
    device: dict = field(default_factory=dict)
    mode: str = "latency"  # or "throughput": Detector.stream, ``depth`` frames in flight
    depth: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p90": round(float(np.percentile(ms, 90)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3), "mean": round(float(ms.mean()), 3)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (the engine, buffers and the runtime).

    On Linux this is ``VmHWM``: ``ru_maxrss`` survives ``exec``, so a benchmark process started
    by a big parent (e.g. ``edgeyolo report`` after evaluating) would report the parent's peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def synthetic_image(height: int = 720, width: int = 1280, seed: int = 0) -> np.ndarray:
    """A deterministic noise image, for benchmarks without an image at hand."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


STAGES = (*StageTimes.FINE, "preprocess", "postprocess", "host")


def benchmark(detector, images: list, iters: int = 100, warmup: int = 10) -> BenchResult:
    """Time ``detector.detect`` over ``images`` (cycled) after ``warmup`` untimed calls.

    ``images`` are BGR arrays, or paths to time reading them too (the ``read`` stage).
    """
    if iters < 1 or warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    for i in range(warmup):
        detector.detect(images[i % len(images)])
    totals, stages = [], {name: [] for name in STAGES}
    for i in range(iters):
        start = time.perf_counter()
        detector.detect(images[i % len(images)])
        totals.append(time.perf_counter() - start)
        for name in stages:
            stages[name].append(getattr(detector.last_times, name))
    return _result(detector, fps=round(len(totals) / sum(totals), 2), latency_ms=percentiles(totals),
                   stages_ms={name: percentiles(values) for name, values in stages.items()}, iters=iters, warmup=warmup)


def benchmark_throughput(detector, images: list[np.ndarray], iters: int = 100, warmup: int = 10,
                         depth: int = 3) -> BenchResult:
    """Frames per second through ``detector.stream`` (``depth`` in flight) over ``iters`` frames (cycled).

    The warm-up runs a stream of its own first (on OpenVINO it also compiles the THROUGHPUT
    model). ``latency_ms`` holds the intervals between consecutive results; a frame's own
    latency is not measured here (it waits behind up to ``depth - 1`` others).
    """
    if iters < 1 or warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    frames = lambda n: (images[i % len(images)] for i in range(n))  # noqa: E731
    for _ in detector.stream(frames(max(warmup, 1)), depth=depth):
        pass
    stamps = [time.perf_counter()]
    for _ in detector.stream(frames(iters), depth=depth):
        stamps.append(time.perf_counter())
    return _result(detector, fps=round(iters / (stamps[-1] - stamps[0]), 2), latency_ms=percentiles(np.diff(stamps)),
                   stages_ms={}, iters=iters, warmup=warmup, mode="throughput", depth=depth)


def _result(detector, **measured) -> BenchResult:
    engine = detector.engine
    device = engine.memory_stats() if hasattr(engine, "memory_stats") else {}
    info = detector.info
    return BenchResult(
        peak_rss_mb=peak_rss_mb(),
        backend=info.get("backend", "?"),
        threads=info.get("threads"),
        target=info.get("target", "?"),
        input_shape=list(detector.bundle.manifest["input"]["shape"]),
        device={"cpu_count": os.cpu_count(), **device},
        **measured,
    )
