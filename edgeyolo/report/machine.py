"""The machine a report ran on: CPU model and flags, cores, memory, load, backend versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# Instruction-set flags that decide which kernels the backends pick (x86 and ARM).
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                     "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "fphp", "asimdhp", "sve", "i8mm")
PACKAGES = ("edgeyolo", "onnxruntime", "openvino", "ai-edge-litert", "tensorflow", "onnx2tf", "tensorrt",
            "torch", "onnx", "numpy")


def cpuinfo(text: str) -> dict:
    """CPU model name and the interesting flags from the text of ``/proc/cpuinfo``."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return {"model": model, "flags": [f for f in INTERESTING_FLAGS if f in flags]}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_facts() -> dict:
    try:
        cpu = cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        physical, memory_gb = None, None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu["model"], "flags": cpu["flags"], "logical_cores": os.cpu_count(), "physical_cores": physical,
        "memory_gb": memory_gb, "load_average_1m_at_start": round(load[0], 2) if load else None,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(), "packages": package_versions(),
    }
