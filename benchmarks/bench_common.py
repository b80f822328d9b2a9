"""What the alternating target benchmarks share: fixture paths and their command-line options."""

from __future__ import annotations

import argparse
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
