"""edgeyolo's cpu-fp32 Detector vs a hand-rolled "ONNX Runtime session + naive Python pre/post" script.

Both run the very same ONNX file with the same session options; they alternate in rounds
within one process so machine drift affects both alike.

    python benchmarks/bench_vs_naive.py [--bundle DIR] [--weights PT] [--rounds 5] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


class NaiveDetector:
    """What a typical export script does: row-by-row Python decoding and a Python NMS loop."""

    def __init__(self, onnx_path: Path, session_options):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])

    def detect(self, image, conf=0.25, iou=0.45):
        h0, w0 = image.shape[:2]
        r = min(640 / h0, 640 / w0)
        nw, nh = int(round(w0 * r)), int(round(h0 * r))
        canvas = np.full((640, 640, 3), 114, np.uint8)
        top, left = (640 - nh) // 2, (640 - nw) // 2
        canvas[top:top + nh, left:left + nw] = cv2.resize(image, (nw, nh))
        x = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        pred = self.session.run(None, {"images": np.ascontiguousarray(x)})[0][0]
        boxes = []
        for row in pred:  # the naive part: a Python loop over 25200 rows
            if row[4] < conf:
                continue
            scores = row[5:] * row[4]
            cls = int(scores.argmax())
            if scores[cls] < conf:
                continue
            cx, cy, w, h = row[:4]
            boxes.append([(cx - w / 2 - left) / r, (cy - h / 2 - top) / r, (cx + w / 2 - left) / r,
                          (cy + h / 2 - top) / r, float(scores[cls]), cls])
        boxes.sort(key=lambda b: -b[4])
        kept = []
        for b in boxes:
            if all(b[5] != k[5] or _iou(b, k) <= iou for k in kept):
                kept.append(b)
        return kept


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def time_calls(fn, images, iters):
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        fn(images[i % len(images)])
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples):
    ms = np.asarray(samples) * 1000
    return {"fps": round(len(ms) / (ms.sum() / 1000), 2), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="A cpu-fp32 bundle (built from --weights if absent).")
    parser.add_argument("--weights", default=str(FIXTURES / "weights" / "yolov5n.pt"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import edgeyolo
    from edgeyolo.backends.onnxruntime import session_options
    from edgeyolo.build import build_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(args.weights, "cpu-fp32", Path(tmp) / "cpu-fp32").path
        ours = edgeyolo.load(bundle)
        naive = NaiveDetector(Path(bundle) / "model.onnx", session_options(0))
        images = [cv2.imread(str(p)) for p in sorted((FIXTURES / "images").glob("*.jpg"))]
        for fn in (ours.detect, naive.detect):  # warm-up
            time_calls(fn, images, 3)
        samples = {"edgeyolo": [], "naive": []}
        for _ in range(args.rounds):
            samples["edgeyolo"] += time_calls(ours.detect, images, args.iters)
            samples["naive"] += time_calls(naive.detect, images, args.iters)
        result = {name: summary(s) for name, s in samples.items()}
        result["speedup"] = round(result["edgeyolo"]["fps"] / result["naive"]["fps"], 2)
        result["threads"] = ours.engine.info["threads"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("edgeyolo", "naive"):
            r = result[name]
            print(f"{name:<9} {r['fps']:7.2f} FPS   p50 {r['p50_ms']:7.2f} ms   p90 {r['p90_ms']:7.2f} ms   "
                  f"p99 {r['p99_ms']:7.2f} ms")
        print(f"speed-up  {result['speedup']:.2f}x  (same ONNX, same session options, {args.rounds} alternating rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
