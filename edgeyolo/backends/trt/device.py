"""The CUDA device through cuda-python: is there a GPU, which one, its memory; streams and buffers.

cuda-python installs everywhere (pycuda needs a CUDA toolchain to build), and its runtime
API answers "no driver" with an error code rather than failing to import, so the GPU check
runs on any machine.
"""

from __future__ import annotations

import ctypes
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import EdgeYoloError

EXTRA = "tensorrt"
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the CUDA runtime is newer than the driver


def cuda_runtime():
    """cuda-python's runtime API (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise EdgeYoloError(
                f"the tensorrt backend needs the 'cuda-python' package: pip install 'edgeyolo[{EXTRA}]'"
            ) from None
    return runtime


def check(result, what: str):
    """Unpack a cuda-python call's ``(error, *values)``; a failure becomes one clear line."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeYoloError(f"CUDA {what} failed: {error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def error_text(err) -> str:
    try:
        message = cuda_runtime().cudaGetErrorString(err)[1]
        return message.decode() if isinstance(message, bytes) else str(message)
    except Exception:  # noqa: BLE001 - the message is a courtesy; the code is what matters
        return str(err)


def gpu_count() -> int:
    """CUDA devices usable here; 0 whenever CUDA cannot be reached, whatever the reason.

    cuda-python answers "no driver" in several ways: an error code (most versions), a
    ``RuntimeError`` on the first call (12.0-12.8 without ``libcuda.so``), an ``ImportError``
    of its extension, or our own error when it is missing. All of them mean "no GPU here", so
    ``build`` writes the portable bundle instead of crashing on a workstation.
    """
    return _device_count()[0]


def _device_count() -> tuple[int, str]:
    """(devices, why none) with every way of failing to reach CUDA folded into ``(0, reason)``."""
    try:
        cudart = cuda_runtime()
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any failure to reach CUDA means no usable GPU
        return 0, f"{type(exc).__name__}: {exc}".strip()
    if int(err) != 0:
        reason = error_text(err)
        if int(err) == INSUFFICIENT_DRIVER:
            driver = driver_cuda_version()
            reason += (": no NVIDIA driver here" if driver == "unknown" else
                       f": this cuda-python is built for a newer CUDA than the driver's {driver}; "
                       "install the cuda-python matching it (docs/jetson.md)")
        return 0, reason
    return (int(count), "") if int(count) > 0 else (0, "no device")


def driver_cuda_version() -> str:
    """The CUDA version the installed driver supports ("12.2"), or "unknown"."""
    try:
        err, version = cuda_runtime().cudaDriverGetVersion()
        if int(err) == 0 and int(version) > 0:
            return f"{int(version) // 1000}.{int(version) % 1000 // 10}"
    except Exception:  # noqa: BLE001 - only a hint in a message
        pass
    return "unknown"


def require_gpu() -> None:
    count, reason = _device_count()
    if not count:
        raise EdgeYoloError(f"the tensorrt backend needs an NVIDIA GPU and its driver; none usable here ({reason})")


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str  # "8.7"
    total_memory: int
    integrated: bool  # Jetson: the GPU shares the system memory


def gpu_facts(device: int = 0) -> GpuFacts:
    require_gpu()
    cudart = cuda_runtime()
    props = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuFacts(name=name.rstrip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}",
                    total_memory=int(props.totalGlobalMem), integrated=bool(props.integrated))


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of GPU memory; on a Jetson, the shared system memory as CUDA sees it."""
    free, total = check(cuda_runtime().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class Stream:
    """One CUDA stream (each ``Detector``'s engine owns one)."""

    def __init__(self):
        self.cudart = cuda_runtime()
        self.handle = check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            self.cudart.cudaStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of GPU memory."""

    def __init__(self, nbytes: int):
        self.cudart = cuda_runtime()
        self.nbytes = int(nbytes)
        self.ptr = check(self.cudart.cudaMalloc(max(self.nbytes, 1)), "cudaMalloc")

    def __int__(self) -> int:
        return int(self.ptr)

    def upload(self, host: np.ndarray, stream: Stream | None = None) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            check(self.cudart.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy")
        else:
            check(self.cudart.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes, kind, stream.handle),
                  "cudaMemcpyAsync")

    def download(self, host: np.ndarray, stream: Stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes, kind, stream.handle),
              "cudaMemcpyAsync")

    def close(self) -> None:
        if self.ptr is not None:
            self.cudart.cudaFree(self.ptr)
            self.ptr = None


class PinnedArray:
    """A numpy array in page-locked host memory, so copies to and from the GPU run asynchronously."""

    def __init__(self, shape, dtype):
        self.cudart = cuda_runtime()
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = check(self.cudart.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost")
        raw = (ctypes.c_ubyte * max(nbytes, 1)).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr is not None:
            self.array = None
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = None


# Jetson boards expose GPU load and temperatures in sysfs (what tegrastats prints).
_GPU_LOAD_FILES = ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load",
                   "/sys/devices/platform/bus@0/17000000.gpu/load", "/sys/devices/platform/17000000.ga10b/load")


def jetson_stats() -> dict:
    """tegrastats-style figures where the board exposes them: GPU load (%), thermal zones (°C)."""
    stats = {}
    for path in _GPU_LOAD_FILES:
        value = _read_number(path)
        if value is not None:
            stats["gpu_load_percent"] = round(value / 10.0, 1)  # per-mille
            break
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        kind = Path(zone, "type").read_text().strip() if Path(zone, "type").is_file() else None
        value = _read_number(f"{zone}/temp")
        if kind and value is not None and ("gpu" in kind.lower() or "cpu" in kind.lower()):
            temps[kind] = round(value / 1000.0, 1)
    if temps:
        stats["temperatures_c"] = temps
    return stats


def _read_number(path: str) -> float | None:
    try:
        return float(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
