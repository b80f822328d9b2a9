#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and TensorRT (8.5-11.x): check CUDA with one real round trip, build
# cuda-fp16 and cuda-int8, evaluate both on the eval set, benchmark both, and print one summary
# (with the graph each engine was compiled from: weakly typed before TensorRT 10.12, strongly typed
# after). Takes under 8 minutes on a desktop/server GPU (most of it: the two engine builds and the
# INT8 calibration on the CPU).
#
#   benchmarks/gpu_check.sh                 # fixtures from ../shared/fixtures, results in ./gpu-check
#   EDGEYOLO_FIXTURES=/data/fixtures OUT=/tmp/gpu-check benchmarks/gpu_check.sh
#
# Needs: pip install -e ".[export,onnxruntime,eval,tensorrt]" and TensorRT's Python package.
set -euo pipefail
cd "$(dirname "$0")/.."
FIXTURES=${EDGEYOLO_FIXTURES:-../shared/fixtures}
OUT=${OUT:-gpu-check}
WEIGHTS=$FIXTURES/weights/yolov5n.pt
CALIB=$FIXTURES/coco128/images
DATA=$FIXTURES/coco-val-500
mkdir -p "$OUT"

# device count + pinned -> GPU -> pinned on a stream; fails in one line (e.g. cuda-python newer than the driver)
python -m edgeyolo.backends.trt.selfcheck --require-tensorrt || exit 1

step() { echo "[$(date +%T)] $*" >&2; }
timed() { local start=$SECONDS; "$@"; echo $((SECONDS - start)); }

step "build cuda-fp16"
fp16_s=$(timed edgeyolo build "$WEIGHTS" -t cuda-fp16 -o "$OUT/cuda-fp16" 2>"$OUT/cuda-fp16.build.log" | tail -1)
step "build cuda-int8 (calibrated on coco128)"
int8_s=$(timed edgeyolo build "$WEIGHTS" -t cuda-int8 --calib "$CALIB" --calib-size 128 -o "$OUT/cuda-int8" \
         2>"$OUT/cuda-int8.build.log" | tail -1)

for target in cuda-fp16 cuda-int8; do
  step "eval $target on $DATA"
  edgeyolo eval "$OUT/$target" --data "$DATA" --json >"$OUT/$target.eval.json"
  step "bench $target"
  edgeyolo bench "$OUT/$target" --iters 300 --warmup 30 --images "$FIXTURES/images" --json >"$OUT/$target.bench.json"
done
step "eval cuda-int8's Q/DQ ONNX on onnxruntime (the CPU estimate of the same graph)"
edgeyolo eval "$OUT/cuda-int8" --backend onnxruntime --data "$DATA" --limit 100 --json >"$OUT/cuda-int8.ort100.json"
edgeyolo eval "$OUT/cuda-int8" --data "$DATA" --limit 100 --json >"$OUT/cuda-int8.trt100.json"

FP16_S=$fp16_s INT8_S=$int8_s python - "$OUT" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
load = lambda name: json.loads((out / name).read_text())
print(f"{'target':<10}{'build s':>8}{'mAP50-95':>10}{'mAP50':>8}{'FPS':>8}{'p50 ms':>8}{'infer ms':>9}{'GPU MB':>8}")
for target, seconds in (("cuda-fp16", os.environ["FP16_S"]), ("cuda-int8", os.environ["INT8_S"])):
    ev, bench = load(f"{target}.eval.json"), load(f"{target}.bench.json")
    device = bench.get("device", {})
    print(f"{target:<10}{seconds:>8}{ev['map50_95'] * 100:>10.2f}{ev['map50'] * 100:>8.2f}{bench['fps']:>8.1f}"
          f"{bench['latency_ms']['p50']:>8.2f}{bench['stages_ms']['inference']['p50']:>9.2f}"
          f"{device.get('engine_activation_mb', 0) + device.get('io_buffers_mb', 0):>8.1f}")
for target in ("cuda-fp16", "cuda-int8"):
    for record in sorted((out / target / "engines").glob("*.json")):
        meta = json.loads(record.read_text())
        build = meta.get("build", {})
        print(f"{target}: engine compiled from {meta.get('source')}, {build.get('typing', '?')}ly typed"
              + (f", INT8 {build['int8']}" if build.get("int8") else ""))
ort, trt = load("cuda-int8.ort100.json"), load("cuda-int8.trt100.json")
print(f"cuda-int8 on 100 images: TensorRT {trt['map50_95'] * 100:.2f} vs its Q/DQ ONNX on onnxruntime "
      f"{ort['map50_95'] * 100:.2f} mAP50-95")
EOF
