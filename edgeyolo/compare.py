"""Side-by-side comparison of bundles: accuracy, speed, memory and size.

Each benchmark runs in a fresh process (so peak memory is the engine's own, not the
sum of everything loaded before it), and bundles take turns round by round so machine
drift affects all of them alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import load_bundle
from .errors import EdgeYoloError


@dataclass
class Row:
    bundle: str
    target: str
    backend: str
    precision: str
    size_mb: float
    fps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    map50_95: float | None = None
    map50: float | None = None

    def to_dict(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 2) if xs else None  # noqa: E731
        return {"bundle": self.bundle, "target": self.target, "backend": self.backend, "precision": self.precision,
                "size_mb": self.size_mb, "fps": med(self.fps), "p50_ms": med(self.p50_ms), "p99_ms": med(self.p99_ms),
                "peak_rss_mb": med(self.peak_rss_mb), "map50_95": self.map50_95, "map50": self.map50}


def bench_in_subprocess(bundle: Path, iters: int, warmup: int) -> dict:
    command = [sys.executable, "-m", "edgeyolo.cli", "bench", str(bundle), "--iters", str(iters),
               "--warmup", str(warmup), "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["benchmark failed"])[-1]
        raise EdgeYoloError(f"{bundle}: {last}")
    return json.loads(result.stdout)


def bench_in_turns(bundles: list[str], rounds: int, iters: int, warmup: int, on_result,
                   done: dict[str, int] | None = None, on_error=None) -> None:
    """Benchmark every bundle ``rounds`` times, one fresh process each, bundles taking turns round by round.

    ``on_result(bundle, result)`` sees each result as it comes (so a caller can save it at once);
    ``done`` (bundle → rounds already measured) lets an interrupted series continue where it stopped.
    With ``on_error(bundle, exc)`` a bundle whose benchmark fails is reported and left out of later
    rounds instead of stopping the series.
    """
    done, failed = dict(done or {}), set()
    for round_index in range(rounds):
        for bundle in bundles:
            if done.get(bundle, 0) > round_index or bundle in failed:
                continue
            try:
                result = bench_in_subprocess(Path(bundle), iters, warmup)
            except EdgeYoloError as exc:
                if on_error is None:
                    raise
                failed.add(bundle)
                on_error(bundle, exc)
                continue
            on_result(bundle, result)
            done[bundle] = done.get(bundle, 0) + 1


def compare(bundles: list[Path], data=None, limit: int | None = None, rounds: int = 3, iters: int = 50,
            warmup: int = 5, progress=None) -> list[dict]:
    rows = []
    for path in bundles:
        b = load_bundle(path)
        size = sum((b.path / name).stat().st_size for name in b.manifest["checksums"]) / 1e6
        rows.append(Row(bundle=str(path), target=b.target["name"], backend=b.backend,
                        precision=b.target["precision"], size_mb=round(size, 2)))
    by_path = {row.bundle: row for row in rows}

    def record(path: str, result: dict) -> None:
        row = by_path[path]
        row.fps.append(result["fps"])
        row.p50_ms.append(result["latency_ms"]["p50"])
        row.p99_ms.append(result["latency_ms"]["p99"])
        row.peak_rss_mb.append(result["peak_rss_mb"])
        if progress:
            progress(1)

    bench_in_turns(list(by_path), rounds, iters, warmup, record)
    if data is not None:
        from .datasets import load_dataset
        from .evaluate import evaluate
        from .gate import load_for_eval

        dataset = load_dataset(data)
        for row in rows:
            result = evaluate(load_for_eval(load_bundle(row.bundle)), dataset, limit=limit)
            row.map50_95, row.map50 = round(result.map50_95 * 100, 2), round(result.map50 * 100, 2)
    return [row.to_dict() for row in rows]
