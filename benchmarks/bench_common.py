"""What the alternating target benchmarks share: fixture paths and their command-line options."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EDGEYOLO_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def target_bench_parser(doc: str, int8_target: str) -> argparse.ArgumentParser:
    """Options every build-then-alternate benchmark takes; each script adds its own after."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--weights", default=str(FIXTURES / "weights" / "yolov5n.pt"))
    parser.add_argument("--calib", default=str(FIXTURES / "coco128" / "images"),
                        help=f"Calibration images for {int8_target} (folder, list file or named set).")
    parser.add_argument("--calib-size", type=int, help="Calibration images to draw [default: all, up to 300].")
    parser.add_argument("--images", default=str(FIXTURES / "images"), help="Images to detect on (cycled).")
    parser.add_argument("--out", default="bench-bundles", help="Folder for the bundles (reused when present).")
    parser.add_argument("--rounds", type=int, default=10, help="Interleaved rounds per engine.")
    parser.add_argument("--iters", type=int, default=20, help="Timed detect() calls per engine per round.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed calls per engine before the first round.")
    return parser


def ensure_bundles(weights, targets, out, calib, calib_size=None) -> tuple[dict[str, Path], dict[str, float]]:
    """Each target's bundle in ``out``, built unless already there; build seconds of those built now."""
    import sys
    import time

    from edgeyolo.build import build_bundle, prepare_calibration
    from edgeyolo.bundle import is_bundle
    from edgeyolo.targets import load_target

    bundles, build_seconds = {}, {}
    for spec in targets:
        target = load_target(spec)
        path = Path(out) / target.name
        if not is_bundle(path):
            start = time.perf_counter()
            calibration = (prepare_calibration(weights, target, calib, calib_size)
                           if target.needs_calibration else None)
            build_bundle(weights, target, path, calibration=calibration)
            build_seconds[target.name] = round(time.perf_counter() - start, 1)
            print(f"built {path} in {build_seconds[target.name]} s", file=sys.stderr)
        bundles[target.name] = path
    return bundles, build_seconds


def run_interleaved(bundles: dict[str, Path], args) -> dict[str, dict]:
    """Benchmark the bundles in one process, strictly one engine at a time, round after round."""
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


def write_speed_report(results: dict[str, dict], path: Path) -> dict:
    """Each bundle's FPS and its ratio to the ``fp32`` bundle of the same interleaved run, printed and saved."""
    report = {name: {"fps": r["fps"], "ratio_to_fp32": round(r["fps"] / results["fp32"]["fps"], 3)}
              for name, r in results.items()}
    report["_machine"] = {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                          "note": "interleaved rounds in one process; other processes share this CPU"}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def summarise(info: dict, rounds: list[dict]) -> dict:
    """Pooled FPS over every round; latency percentiles as the median of the rounds' own percentiles."""
    import numpy as np

    seconds = sum(r["iters"] / r["fps"] for r in rounds)
    iters = sum(r["iters"] for r in rounds)

    def median_of(key, stage=None):
        return round(float(np.median([(r["stages_ms"][stage] if stage else r["latency_ms"])[key] for r in rounds])), 2)

    return {"info": info, "fps": round(iters / seconds, 2), "fps_per_round": [r["fps"] for r in rounds],
            "latency_ms": {k: median_of(k) for k in ("p50", "p90", "p99")},
            "inference_ms_p50": median_of("p50", "inference"), "iters": iters}
