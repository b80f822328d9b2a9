"""End to end, as a user runs it: images read from disk, detect settings, every CPU target, sync and stream.

    PYTHONPATH=$PWD python benchmarks/bench_e2e.py [--targets cpu-fp32,intel-cpu-int8] [--images 100]
        [--rounds 3] [--depth 3] [--baseline-src DIR] [--out bench-e2e] [--json FILE]

Every measurement is a fresh process (``--child``): import, open the bundle, detect on the
first image the way the mode does (``detect`` or a one-frame ``stream``: time to first
detection, counted from the process's launch, compiling included), then every image
path once, synchronously (``detect`` one by one) or pipelined (``Detector.stream``), reading
each JPEG from disk inside the timed loop. It reports FPS, the mean per-stage host times
(sync runs), CPU time per frame (every thread of the process: less sensitive than FPS to
other jobs on the machine), peak RSS (VmHWM) and time to first detection. Runs of all arms alternate, round
after round (order reversed every other round), and medians of the rounds are printed, so
load from other processes hits every arm alike.

Arms: this checkout's runtime on bundles it builds (``new``); with ``--baseline-src`` (a
checkout of an earlier release, e.g. ``git archive <ref> | tar -x -C DIR``) that runtime on
bundles that checkout builds (``base``: the previous release path, as upstream YOLOv5's
``detect.py`` is not installable here); and for cpu-fp32 the naive per-frame script of
``bench_vs_naive.py`` on the float ONNX (``naive``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = Path(os.environ.get("EDGEYOLO_FIXTURES", ROOT.parent / "shared" / "fixtures"))
DEFAULT_TARGETS = "cpu-fp32,cpu-int8,intel-cpu-fp32,intel-cpu-bf16,intel-cpu-int8"
STAGES = ("read", "letterbox", "to_input", "inference", "decode", "nms", "scale")


# --------------------------------------------------------------------------- one measurement, in its own process
def child(args) -> None:
    paths = image_paths(args.images)
    if args.naive:
        result = naive_run(args, paths)
    else:
        from edgeyolo.bench import peak_rss_mb
        from edgeyolo.runtime import load

        detector = load(args.child)
        if args.mode == "stream":  # the first detection as a streaming process gets it (OpenVINO: its stream model)
            for _ in detector.stream(paths[:1], depth=args.depth):
                pass
        else:
            detector.detect(paths[0])
        first = time.time() - args.launched
        stages = {name: [] for name in STAGES}
        cpu_start, start = cpu_seconds(), time.perf_counter()
        if args.mode == "stream":
            for _ in detector.stream(paths, depth=args.depth):
                pass
        else:
            for path in paths:
                detector.detect(path)
                for name in STAGES:
                    stages[name].append(getattr(detector.last_times, name, 0.0))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        result = {"fps": len(paths) / seconds, "cpu_ms": 1000 * cpu / len(paths), "first_detection_s": first,
                  "peak_rss_mb": peak_rss_mb()}
        if args.mode == "sync":
            result["stages_ms"] = {name: 1000 * statistics.fmean(v) for name, v in stages.items()}
    print(json.dumps(result))


def naive_run(args, paths) -> dict:
    """``bench_vs_naive``'s hand-rolled script: cv2.imread, then its own letterbox, Python decode and NMS."""
    import cv2

    sys.path.insert(0, str(HERE))
    from bench_vs_naive import NaiveDetector

    from edgeyolo.backends.onnxruntime import session_options
    from edgeyolo.bench import peak_rss_mb

    naive = NaiveDetector(Path(args.child), session_options(0))
    naive.detect(cv2.imread(paths[0]))
    first = time.time() - args.launched
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for path in paths:
        naive.detect(cv2.imread(path))
    return {"fps": len(paths) / (time.perf_counter() - start), "cpu_ms": 1000 * (cpu_seconds() - cpu_start) / len(paths),
            "first_detection_s": first, "peak_rss_mb": peak_rss_mb()}


def cpu_seconds() -> float:
    """CPU time of this process, every thread (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def image_paths(count: int) -> list[str]:
    return [str(p) for p in sorted((FIXTURES / "coco128" / "images").glob("*.jpg"))[:count]]


# --------------------------------------------------------------------------- the parent: bundles, arms, rounds
def run_child(arm: dict, args) -> dict:
    env = {**os.environ, "PYTHONPATH": arm["src"]}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(arm["bundle"]), "--mode", arm["mode"],
               "--images", str(args.images), "--depth", str(args.depth), "--launched", repr(time.time())]
    if arm["kind"] == "naive":
        command.append("--naive")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{arm['name']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_bundles(src: str, targets: list[str], out: Path, args) -> dict[str, Path]:
    """Each target's bundle built by the runtime at ``src`` (reused when already there)."""
    bundles = {}
    for target in targets:
        path = (out / target).resolve()
        if not (path / "manifest.json").is_file():
            command = [sys.executable, "-m", "edgeyolo.cli", "build", args.weights, "-t", target, "-o", str(path)]
            if "int8" in target:
                command += ["--calib", args.calib, "--calib-size", str(args.calib_size)]
            print(f"building {path} with {src}", file=sys.stderr)
            # cwd=src: ``python -m`` puts the working directory ahead of PYTHONPATH on sys.path
            subprocess.run(command, env={**os.environ, "PYTHONPATH": src}, cwd=src, check=True, capture_output=True)
        bundles[target] = path
    return bundles


def arms_for(args, targets) -> list[dict]:
    out = Path(args.out)
    sources = {"new": str(ROOT)}
    if args.baseline_src:
        sources["base"] = str(Path(args.baseline_src).resolve())
    bundles = {kind: build_bundles(src, targets, out / kind, args) for kind, src in sources.items()}
    arms = []  # the arms of one target side by side, so each comparison is close in time
    for target in targets:
        for mode in ("sync", "stream"):
            for kind, src in sources.items():
                arms.append({"name": f"{target} {mode} {kind}", "target": target, "mode": mode, "kind": kind,
                             "src": src, "bundle": bundles[kind][target]})
    float_onnx = out / "base" / "cpu-fp32" / "model.onnx"
    if "cpu-fp32" in targets and args.baseline_src and float_onnx.is_file():
        arms.append({"name": "cpu-fp32 sync naive", "target": "cpu-fp32", "mode": "sync", "kind": "naive",
                     "src": str(ROOT), "bundle": float_onnx})
    return arms


def summarise(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    summary = {"fps": med("fps"), "cpu_ms": med("cpu_ms") if all("cpu_ms" in r for r in runs) else float("nan"),
               "first_detection_s": med("first_detection_s"),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rounds": len(runs)}
    if "stages_ms" in runs[0]:
        summary["stages_ms"] = {s: statistics.median(r["stages_ms"][s] for r in runs) for s in STAGES}
        summary["host_ms"] = sum(v for s, v in summary["stages_ms"].items() if s != "inference")
    return summary


def print_table(results: dict, targets: list[str], args) -> None:
    print(f"\n{args.images} coco128 images read from disk per run, {args.rounds} alternating rounds, fresh process "
          f"per run, stream depth {args.depth}, detect settings (conf 0.25, IoU 0.45); medians of rounds")
    print(f"{'target':<16} {'mode':<7} {'base FPS':>9} {'new FPS':>8} {'new/base':>9} {'host ms base→new':>17} "
          f"{'CPU ms/frame':>13} {'peak RSS MB':>12} {'1st det s':>10}")
    for target in targets:
        for mode in ("sync", "stream"):
            new, base = results.get(f"{target} {mode} new"), results.get(f"{target} {mode} base")
            if new is None:
                continue
            ratio = f"{new['fps'] / base['fps']:.2f}x" if base else "-"
            host = (f"{base['host_ms']:.1f}→{new['host_ms']:.1f}" if base and "host_ms" in base
                    else f"{new.get('host_ms', float('nan')):.1f}" if "host_ms" in new else "-")
            print(f"{target:<16} {mode:<7} {base['fps'] if base else float('nan'):>9.1f} {new['fps']:>8.1f} "
                  f"{ratio:>9} {host:>17} {new['cpu_ms']:>13.1f} {new['peak_rss_mb']:>12.0f} "
                  f"{new['first_detection_s']:>10.2f}")
        if f"{target} sync new" in results and f"{target} stream new" in results:
            sync, stream = results[f"{target} sync new"], results[f"{target} stream new"]
            print(f"{'':<16} stream/sync (new) {stream['fps'] / sync['fps']:.2f}x FPS, "
                  f"{sync['cpu_ms'] / stream['cpu_ms']:.2f}x frames per CPU second")
    naive = results.get("cpu-fp32 sync naive")
    if naive:
        new = results["cpu-fp32 sync new"]
        print(f"naive per-frame script (cpu-fp32 ONNX): {naive['fps']:.1f} FPS; edgeyolo sync "
              f"{new['fps'] / naive['fps']:.2f}x, stream {results['cpu-fp32 stream new']['fps'] / naive['fps']:.2f}x")
    print("\nper-stage host ms (sync, mean per image; medians of rounds)")
    print(f"{'arm':<28} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'host':>7}")
    for name, r in results.items():
        if "stages_ms" in r:
            print(f"{name:<28} " + " ".join(f"{r['stages_ms'][s]:>9.2f}" for s in STAGES) + f" {r['host_ms']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help="Comma-separated targets.")
    parser.add_argument("--images", type=int, default=100, help="coco128 images per run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=3, help="Detector.stream depth.")
    parser.add_argument("--baseline-src", help="A checkout of the earlier release to compare with.")
    parser.add_argument("--out", default="bench-e2e", help="Folder for the bundles (reused when present).")
    parser.add_argument("--weights", default=str(FIXTURES / "weights" / "yolov5n.pt"))
    parser.add_argument("--calib", default=str(FIXTURES / "coco128" / "images"))
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--json", help="Also write every run and the summary here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sync", choices=("sync", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    arms = arms_for(args, targets)
    runs: dict[str, list] = {arm["name"]: [] for arm in arms}
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            runs[arm["name"]].append(run_child(arm, args))
            print(f"round {r + 1}: {arm['name']}: {runs[arm['name']][-1]['fps']:.1f} FPS", file=sys.stderr)
    results = {name: summarise(values) for name, values in runs.items()}
    print_table(results, targets, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
