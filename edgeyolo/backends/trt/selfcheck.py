"""One real round trip through CUDA, as the TensorRT backend makes it: ``python3 -m edgeyolo.backends.trt.selfcheck``.

Importing cuda-python proves little: a cuda-python built for a newer CUDA than the board's
driver imports fine and fails on the first call (``cudaErrorInsufficientDriver``), after
which edgeyolo sees no GPU. This check counts the devices, then copies a pinned buffer to
the GPU and back on a stream of its own, and prints one line; ``Dockerfile.jetson`` runs it
and so does ``benchmarks/gpu_check.sh``. Exit status 0: usable; 1: not, with the reason.
"""

from __future__ import annotations

import sys

import numpy as np

from ...errors import EdgeYoloError


def cuda_python_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "?"
    for name in ("cuda-python", "cuda-bindings"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"


def round_trip(nbytes: int = 1 << 20) -> dict:
    """Device count, a pinned host buffer → GPU → a second pinned buffer on one stream; the facts, or an error."""
    from .device import (
        DeviceBuffer,
        PinnedArray,
        Stream,
        driver_cuda_version,
        gpu_count,
        gpu_facts,
        require_gpu,
    )

    require_gpu()
    gpu = gpu_facts()
    count = nbytes // 4
    sent, back = PinnedArray((count,), np.float32), PinnedArray((count,), np.float32)
    device, stream = DeviceBuffer(sent.array.nbytes), Stream()
    try:
        sent.array[:] = np.arange(count, dtype=np.float32)
        back.array[:] = -1.0
        device.upload(sent.array, stream)
        device.download(back.array, stream)
        stream.synchronize()
        if not np.array_equal(sent.array, back.array):
            raise EdgeYoloError("CUDA copied the test buffer to the GPU and back, but it came back different")
    finally:
        device.close()
        stream.close()
        sent.close()
        back.close()
    return {"devices": gpu_count(), "gpu": gpu.name, "compute_capability": gpu.compute_capability,
            "driver_cuda": driver_cuda_version(), "cuda_python": cuda_python_version(), "bytes": count * 4}


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    from .builder import check_version

    check_version(tensorrt)
    return tensorrt.__version__


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        facts = round_trip()
        trt = tensorrt_version()
    except EdgeYoloError as exc:
        print(f"edgeyolo selfcheck: FAILED: {exc}", file=sys.stderr)
        return 1
    if "--require-tensorrt" in args and trt is None:
        print("edgeyolo selfcheck: FAILED: TensorRT's Python package is not installed", file=sys.stderr)
        return 1
    print(f"edgeyolo selfcheck: ok: {facts['devices']} CUDA device(s), {facts['gpu']} (sm {facts['compute_capability']}), "
          f"driver CUDA {facts['driver_cuda']}, cuda-python {facts['cuda_python']}, TensorRT {trt or 'not installed'}; "
          f"{facts['bytes'] >> 20} MiB pinned -> GPU -> pinned on one stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
