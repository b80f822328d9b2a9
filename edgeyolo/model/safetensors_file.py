"""A safetensors file read defensively: the header is checked completely before any tensor is read.

The safetensors layout is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, byte range; plus an optional ``__metadata__`` of string pairs) and the raw bytes. We refuse
unknown dtypes, ranges that disagree with the shapes, gaps or overlaps, and files whose header
claims more bytes than the file holds or than a sane limit, so nothing is allocated on the word
of a hostile header. Writing goes through a temporary file and a rename.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EdgeYoloError
from ..schema import loads_json

MAX_HEADER_BYTES = 16 << 20
MAX_DATA_BYTES = 4 << 30
MAX_TENSORS = 20_000
MAX_DIMS = 8
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def looks_like_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or a file that opens with a plausible header length and ``{``."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES and head[8:9] == b"{"


def read_header(path: Path, max_data_bytes: int = MAX_DATA_BYTES) -> Header:
    """The validated header of ``path`` (one-line ``EdgeYoloError`` for anything wrong)."""
    def fail(msg: str):
        raise EdgeYoloError(f"{path}: {msg}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                fail("too short to be a safetensors file")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                fail(f"not a safetensors file (its first 8 bytes give a header of {n} bytes in a {size}-byte file)")
            raw = f.read(n)
    except OSError as exc:
        fail(f"cannot read ({exc.strerror or exc})")
    try:
        header = loads_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        fail("not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        fail("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        fail("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        fail(f"holds {len(header)} tensors (limit {MAX_TENSORS})")
    tensors, spans = {}, []
    for name, info in header.items():
        tensors[name] = _tensor_info(name, info, fail)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    total = sum(t.nbytes for t in tensors.values())
    if total > max_data_bytes:
        fail(f"its header claims {total / 1e9:.1f} GB of tensors (limit {max_data_bytes / 1e9:.1f} GB)")
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            fail(f"tensor {name!r}: byte ranges overlap or leave gaps")
        position = end
    if 8 + n + position != size:
        fail(f"header describes {position} bytes of tensors but the file holds {size - 8 - n} (truncated or padded)")
    return Header(tensors=tensors, metadata=metadata)


def _tensor_info(name: str, info, fail) -> TensorInfo:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        fail(f"tensor {name!r}: malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        fail(f"tensor {name!r}: unsupported dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        fail(f"tensor {name!r}: malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        fail(f"tensor {name!r}: malformed data_offsets")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        fail(f"tensor {name!r}: its byte range does not match shape {shape} of {dtype}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), nbytes=nbytes)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a file whose header ``read_header`` already accepted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EdgeYoloError(f"{path}: cannot read its tensors ({str(exc).splitlines()[0][:200]})") from None


def read_metadata_json(path: Path, header: Header, key: str, what: str) -> dict:
    """The JSON object stored under ``key`` in the file's safetensors metadata."""
    text = header.metadata.get(key)
    if text is None:
        raise EdgeYoloError(f"{path}: a safetensors file without an edgeyolo {what} (metadata key {key!r})")
    try:
        value = loads_json(text)
    except json.JSONDecodeError as exc:
        raise EdgeYoloError(f"{path}: its {what} is not valid JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:
        raise EdgeYoloError(f"{path}: its {what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise EdgeYoloError(f"{path}: its {what} must be a JSON object")
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``safetensors`` save to a temporary sibling, flushed, then renamed over ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
