"""Small explicit validators for the files users hand us (manifests, targets, label files, yamls).

Each check names the file and the field and says what was expected, so a malformed value
becomes one clear ``EdgeYoloError`` line where it is read, never a ``KeyError`` or
``TypeError`` further down. ``bool`` is never accepted as a number (``imgsz = true``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .errors import EdgeYoloError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
C_SCANNER_MAX_DEPTH = 200  # well inside any recursion limit and any C stack
MAX_YAML_BYTES = 1 << 20  # a model, hyp or data yaml is a few kB
MAX_YAML_FLOW_DEPTH = 100  # [ / { levels a user's yaml may nest (a model yaml needs 3)


def read_yaml_file(path: Path, what: str, invalid: str = "not valid YAML"):
    """A user's YAML file, size-checked before it is read and parsed with ``yaml.safe_load``
    (plain data only, never an object constructed from a tag); any failure is one clear line
    naming ``what`` (``model yaml``, ``hyp file``, ...), ``invalid`` saying a parse failed."""
    import yaml  # the [eval]/[train] extras bring pyyaml; plain .pt loading does not need it

    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise EdgeYoloError(f"{path}: {what} larger than {MAX_YAML_BYTES} bytes")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        if bracket_depth(raw) > MAX_YAML_FLOW_DEPTH:  # PyYAML's scanner is quadratic in it
            raise EdgeYoloError(f"{path}: {invalid} (nested deeper than {MAX_YAML_FLOW_DEPTH} levels)")
        return yaml.safe_load(text)
    except OSError as exc:
        raise EdgeYoloError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeYoloError(f"{path}: {invalid} ({reason})") from None
    except RecursionError:
        raise EdgeYoloError(f"{path}: {invalid} (nested too deeply)") from None


def bracket_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in ``raw``, counted conservatively (brackets in strings too)."""
    codes = np.frombuffer(raw, dtype=np.uint8)
    step = np.isin(codes, (0x5B, 0x7B)).astype(np.int32) - np.isin(codes, (0x5D, 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max()) if step.size else 0


def loads_json(data):
    """``json.loads`` that no nesting depth can crash; raises what ``json.loads`` raises.

    CPython's C scanner recurses on the C stack once per nesting level, guarded only by the
    interpreter's recursion limit, which some libraries raise to the C int maximum (onnx2tf
    does on import): a file nested 100,000 deep then kills the process with SIGSEGV. A
    document whose bracket depth, counted conservatively (brackets inside strings too), stays
    small goes to the fast C scanner; any other to the pure-Python one, whose recursion raises
    ``RecursionError`` or, on Python >= 3.11, lives on the heap.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    text = raw.decode("utf-8")
    if bracket_depth(raw) <= C_SCANNER_MAX_DEPTH:
        return json.loads(text)
    decoder = json.JSONDecoder()
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    return decoder.decode(text)


class Fields:
    """Typed access to one mapping read from the file ``where`` (``section`` names nested tables)."""

    def __init__(self, data, where: str, section: str = ""):
        if not isinstance(data, dict):
            raise EdgeYoloError(f"{where}: {section or 'the file'} must be a table/object, not {type_name(data)}")
        self.data, self.where, self.section = data, where, section

    def _name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, message: str):
        raise EdgeYoloError(f"{self.where}: {self._name(key)} {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default=None, required: bool = False):
        if key not in self.data:
            if required:
                raise EdgeYoloError(f"{self.where}: the required key {self._name(key)!r} is missing")
            return default
        return self.data[key]

    def string(self, key: str, default: str | None = None, required: bool = False, choices=None,
               pattern: re.Pattern | None = None, max_len: int = 4096, hint: str = "") -> str:
        value = self.raw(key, default, required)
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {type_name(value)}")
        if len(value) > max_len:
            self.fail(key, f"is longer than {max_len} characters")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(map(str, choices))}, not {value!r}")
        if pattern is not None and not pattern.match(value):
            self.fail(key, f"{value!r} is not allowed here{f' ({hint})' if hint else ''}")
        return value

    def integer(self, key: str, default: int | None = None, required: bool = False, lo: int | None = None,
                hi: int | None = None) -> int:
        value = self.raw(key, default, required)
        return check_int(value, f"{self.where}: {self._name(key)}", lo, hi)

    def number(self, key: str, default: float | None = None, required: bool = False, lo: float | None = None,
               hi: float | None = None) -> float:
        value = self.raw(key, default, required)
        return check_number(value, f"{self.where}: {self._name(key)}", lo, hi)

    def boolean(self, key: str, default: bool | None = None, required: bool = False) -> bool:
        value = self.raw(key, default, required)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        return value

    def table(self, key: str, required: bool = False) -> "Fields":
        value = self.raw(key, {}, required)
        return Fields(value, self.where, self._name(key))

    def only(self, allowed) -> None:
        """Refuse keys nobody reads (a typo would otherwise be silently ignored)."""
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            where = f" in {self.section}" if self.section else ""
            raise EdgeYoloError(f"{self.where}: unknown key(s){where}: {', '.join(map(str, unknown))} "
                                f"(known: {', '.join(sorted(allowed))})")


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def check_int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgeYoloError(f"{what} must be an integer, not {value!r}")
    _check_range(value, what, lo, hi)
    return value


def check_number(value, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeYoloError(f"{what} must be a finite number, not {value!r}")
    _check_range(value, what, lo, hi)
    return float(value)


def _check_range(value, what: str, lo, hi) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise EdgeYoloError(f"{what} must be {bounds}, not {value}")


def int_list(value, what: str, length: int | None = None, lo: int | None = None, hi: int | None = None,
             allow=()) -> list:
    """A list of integers (or of the symbolic values in ``allow``, e.g. ``"batch"``)."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else ""
        raise EdgeYoloError(f"{what} must be a list of {size}integers, not {value!r}"[:300])
    for item in value:
        if item not in allow or isinstance(item, (int, float)):
            check_int(item, what, lo, hi)
    return value
