"""The schema of ``manifest.json`` and the digest that covers the manifest itself.

A bundle is trusted only for what it holds, so every field the runtime reads is checked
here before any engine is opened: types, ranges, and the facts that must agree with each
other (class names vs ``nc``, the output width vs ``nc + 5``, the letterbox size vs the
input shape, every engine file listed and checksummed). ``manifest_sha256`` is a sha256
over the canonical JSON of the rest of the manifest, so an edit (say ``head`` flipped from
``decoded`` to ``sigmoid``, which keeps every shape) is refused instead of giving wrong boxes.
"""

from __future__ import annotations

import hashlib
import json
import re

from .errors import EdgeYoloError
from .schema import SHA256, Fields, check_int, check_number, int_list

BUNDLE_FORMAT = "edgeyolo-bundle/1"
DIGEST_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIDE = 8192  # pixels, per input side
MAX_CLASSES = 10000
LAYOUTS = ("NCHW", "NHWC")
HEADS = ("decoded", "sigmoid")
PRECISIONS = ("fp32", "fp16", "int8")
# a bundle file name: relative, forward slashes, no empty, "." or ".." parts
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*"
SAFE_NAME = re.compile(rf"^{_PART}(/{_PART})*$")


def canonical_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest, as sorted compact JSON."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its digest (re)computed; call after every change."""
    return {**{k: v for k, v in manifest.items() if k != DIGEST_KEY}, DIGEST_KEY: canonical_digest(manifest)}


def check_digest(manifest: dict, where: str) -> None:
    stored = manifest.get(DIGEST_KEY)
    if not isinstance(stored, str) or not SHA256.match(stored):
        raise EdgeYoloError(f"{where}: manifest.json carries no valid {DIGEST_KEY}; it was written by an older "
                            "edgeyolo or edited by hand: rebuild the bundle")
    if canonical_digest(manifest) != stored:
        raise EdgeYoloError(f"{where}: checksum mismatch for manifest.json: it was edited or corrupted "
                            "after the build; rebuild the bundle")


def check_file_name(name, where: str) -> str:
    """A bundle file name must stay inside the bundle: relative, no ``..``, no absolute path, no backslash."""
    if not isinstance(name, str) or len(name) > 255 or not SAFE_NAME.match(name):
        raise EdgeYoloError(f"{where}: bundle file name {name!r} is not a plain relative path inside the bundle")
    return name


def validate_manifest(manifest, where: str, known_backends) -> dict:
    """Every field the runtime reads, with its type, range and agreement with the others."""
    top = Fields(manifest, where, "")
    fmt = top.raw("format")
    if fmt != BUNDLE_FORMAT:
        raise EdgeYoloError(f"{where}: unsupported bundle format {fmt!r} (expected {BUNDLE_FORMAT})")
    check_digest(manifest, where)
    target = top.table("target", required=True)
    target.string("name", required=True, max_len=200)
    target.string("precision", required=True, choices=PRECISIONS)
    backend = top.table("backend", required=True)
    name = backend.string("name", required=True, choices=tuple(known_backends))
    target.string("backend", default=name)
    files = backend.table("files", required=True)
    if not files.data:
        backend.fail("files", "names no engine file")
    for role, file in files.data.items():
        check_file_name(file, f"{where}: backend.files.{role}")
    backend.table("options")
    _check_checksums(top, files.data, where)
    nc = _check_output(top.table("output", required=True))
    names = top.raw("names", required=True)
    if not isinstance(names, list) or len(names) != nc or not all(isinstance(n, str) for n in names):
        top.fail("names", f"must be a list of {nc} class names (output.nc)")
    imgsz = _check_preprocess(top.table("preprocess", required=True))
    _check_input(top.table("input", required=True), imgsz)
    return manifest


def _check_checksums(top: Fields, files: dict, where: str) -> None:
    checksums = top.table("checksums", required=True)
    if not checksums.data:
        top.fail("checksums", "is empty: nothing in this bundle could be verified")
    for name, digest in checksums.data.items():
        check_file_name(name, f"{where}: checksums")
        if not isinstance(digest, str) or not SHA256.match(digest):
            checksums.fail(name, "must be a sha256 hex digest")
    unlisted = sorted(set(files.values()) - set(checksums.data))
    if unlisted:
        raise EdgeYoloError(f"{where}: engine file(s) {', '.join(unlisted)} have no checksum")


def _check_output(output: Fields) -> int:
    output.string("head", required=True, choices=HEADS)
    nc = output.integer("nc", required=True, lo=1, hi=MAX_CLASSES)
    strides = int_list(output.raw("strides", required=True), f"{output.where}: output.strides", lo=1, hi=1024)
    anchors = output.raw("anchors", required=True)
    if not strides or len(strides) > 8 or not isinstance(anchors, list) or len(anchors) != len(strides):
        output.fail("anchors", "must hold one list of anchors per stride")
    for level in anchors:
        if not isinstance(level, list) or not level or len(level) % 2:
            output.fail("anchors", "must hold (w, h) pairs per stride")
        for value in level:
            check_number(value, f"{output.where}: output.anchors", lo=0, hi=1e5)
    shape = output.raw("shape", required=True)
    int_list(shape, f"{output.where}: output.shape", length=3, lo=1, hi=10_000_000, allow=("batch",))
    if shape[2] != nc + 5:
        output.fail("shape", f"must end in nc + 5 = {nc + 5}, not {shape[2]}")
    return nc


def _check_preprocess(pre: Fields) -> list:
    imgsz = int_list(pre.raw("imgsz", required=True), f"{pre.where}: preprocess.imgsz", length=2, lo=1, hi=MAX_SIDE)
    pre.boolean("auto", default=False)
    pre.boolean("scaleup", default=True)
    pre.integer("stride", default=32, lo=1, hi=1024)
    pre.integer("color", default=114, lo=0, hi=255)
    return imgsz


def _check_input(inp: Fields, imgsz: list) -> None:
    inp.string("name", required=True, max_len=200)
    layout = inp.string("layout", default="NCHW", choices=LAYOUTS)
    shape = int_list(inp.raw("shape", required=True), f"{inp.where}: input.shape", length=4, lo=1, hi=MAX_SIDE,
                     allow=("batch", "height", "width"))
    spatial = shape[2:4] if layout == "NCHW" else shape[1:3]
    channels = shape[1] if layout == "NCHW" else shape[3]
    check_int(channels, f"{inp.where}: input.shape channels", lo=3, hi=3)
    if all(isinstance(d, int) for d in spatial) and list(spatial) != list(imgsz):
        inp.fail("shape", f"{spatial} disagrees with preprocess.imgsz {imgsz}")
