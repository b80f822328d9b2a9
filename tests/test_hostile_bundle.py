"""Tampered bundles: a bundle is trusted only for what it holds (a closed, checksummed set).

Every probe copies the session's real cpu-fp32 bundle, tampers with it as an attacker or an
accident would, and expects one clear ``EdgeYoloError`` (exit 2 and one line from the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import assert_one_line_error, run_cli

import edgeyolo
from edgeyolo.bundle import Bundle, load_bundle
from edgeyolo.errors import EdgeYoloError
from edgeyolo.manifest import DIGEST_KEY, seal


@pytest.fixture
def copy(cpu_fp32_bundle, tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(cpu_fp32_bundle, dest)
    return dest


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write(bundle: Path, manifest: dict, reseal: bool) -> None:
    """Write a tampered manifest; ``reseal`` recomputes its digest, as a careful attacker would."""
    (bundle / "manifest.json").write_text(json.dumps(seal(manifest) if reseal else manifest))


def tamper(bundle: Path, change, reseal: bool = True) -> None:
    manifest = manifest_of(bundle)
    change(manifest)
    write(bundle, manifest, reseal)


def refused(bundle: Path, pattern: str) -> None:
    with pytest.raises(EdgeYoloError, match=pattern):
        load_bundle(bundle)


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside.onnx"
    secret.write_bytes(b"not yours")
    return secret


# --------------------------------------------------------------------------- files outside the bundle
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "./model.onnx", "a//b", "..", "a\\..\\b"])
def test_checksum_names_must_stay_inside(copy, name):
    tamper(copy, lambda m: m["checksums"].__setitem__(name, hashlib.sha256(b"").hexdigest()))
    refused(copy, "not a plain relative path")


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_engine_file_outside_the_bundle_is_refused(copy, tmp_path, where):
    secret = _outside(tmp_path)
    name = str(secret) if where == "absolute" else f"../{secret.name}"
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()

    def point_outside(m):
        m["backend"]["files"]["onnx"] = name
        m["checksums"][name] = digest

    tamper(copy, point_outside)
    refused(copy, "not a plain relative path")


def test_engine_file_not_checksummed_is_refused(copy):
    shutil.copyfile(copy / "model.onnx", copy / "other.onnx")
    tamper(copy, lambda m: m["backend"]["files"].__setitem__("onnx", "other.onnx"))
    refused(copy, "other.onnx have no checksum")


def test_symlinked_engine_is_refused(copy, tmp_path):
    real = tmp_path / "real.onnx"
    shutil.move(copy / "model.onnx", real)
    os.symlink(real, copy / "model.onnx")
    refused(copy, "model.onnx is a symlink")


def test_symlinked_manifest_is_not_a_bundle(copy, tmp_path):
    shutil.move(copy / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", copy / "manifest.json")
    refused(copy, "not a bundle")


# --------------------------------------------------------------------------- the closed set
@pytest.mark.parametrize("reseal", [True, False])
def test_checksums_deleted_or_emptied_is_refused(copy, reseal):
    tamper(copy, lambda m: m.pop("checksums"), reseal)
    refused(copy, "checksums" if reseal else "checksum mismatch for manifest.json")
    tamper(copy, lambda m: m.__setitem__("checksums", {}), reseal=True)
    refused(copy, "checksums is empty")


def test_extra_file_is_refused(copy):
    (copy / "payload.so").write_bytes(b"\x7fELF")
    refused(copy, "payload.so is not part of the bundle")
    (copy / "payload.so").unlink()
    (copy / "engines").mkdir()
    (copy / "engines" / "evil.py").write_text("import os")
    refused(copy, "engines/evil.py is not part of the bundle")


def test_missing_file_is_refused(copy):
    (copy / "model.onnx").unlink()
    refused(copy, "model.onnx is missing")


def test_device_engine_cache_is_accepted(copy):
    """TensorRT caches engines compiled on the device in engines/, each with a sha256 sidecar (trt/cache.py)."""
    engines = copy / "engines"
    engines.mkdir()
    (engines / "trt10.3.0-orin-sm87-fp16-0123456789.engine").write_bytes(b"engine")
    (engines / "trt10.3.0-orin-sm87-fp16-0123456789.json").write_text("{}")
    (engines / "calibration-0123456789abcdef.cache").write_bytes(b"table")
    assert load_bundle(copy).manifest["target"]["name"] == "cpu-fp32"


# --------------------------------------------------------------------------- the manifest's own integrity
def test_flipped_head_is_refused(copy):
    """decoded -> sigmoid keeps every shape and silently gives wrong boxes; the digest catches it."""
    tamper(copy, lambda m: m["output"].__setitem__("head", "sigmoid"), reseal=False)
    refused(copy, "checksum mismatch for manifest.json")


def test_manifest_without_digest_is_refused(copy):
    tamper(copy, lambda m: m.pop(DIGEST_KEY), reseal=False)
    refused(copy, f"no valid {DIGEST_KEY}")


@pytest.mark.parametrize("change, pattern", [
    (lambda m: m["preprocess"].__setitem__("imgsz", [100000, 100000]), "preprocess.imgsz must be between"),
    (lambda m: m["preprocess"].__setitem__("imgsz", True), "preprocess.imgsz must be a list"),
    (lambda m: m["preprocess"].__setitem__("imgsz", [320, 320]), "disagrees with preprocess.imgsz"),
    (lambda m: m["names"].pop(), "names must be a list of 80"),
    (lambda m: m["output"].__setitem__("nc", 79), "must end in nc"),
    (lambda m: m["output"].__setitem__("strides", [0, 16, 32]), "output.strides must be between"),
    (lambda m: m["output"]["anchors"].pop(), "one list of anchors per stride"),
    (lambda m: m["backend"].__setitem__("name", "pickle"), "backend.name must be one of"),
    (lambda m: m["backend"].pop("files"), "'backend.files' is missing"),
    (lambda m: m["input"].__setitem__("layout", "CHWN"), "input.layout must be one of"),
    (lambda m: m.__setitem__("target", "cpu-fp32"), "target must be a table"),
    (lambda m: m["checksums"].__setitem__("model.onnx", 5), "must be a sha256"),
    (lambda m: m.__setitem__("format", "edgeyolo-bundle/99"), "unsupported bundle format"),
], ids=["imgsz-huge", "imgsz-bool", "imgsz-vs-input", "names", "nc", "stride-0", "anchors", "backend", "no-files",
        "layout", "target-type", "digest-type", "format"])
def test_resealed_nonsense_is_refused(copy, change, pattern):
    tamper(copy, change, reseal=True)
    refused(copy, pattern)


@pytest.mark.parametrize("text", ["[]", "null", "[" * 100000 + "]" * 100000, '{"format": "edgeyolo-bundle/1"}'])
def test_malformed_manifest_text(copy, text):
    (copy / "manifest.json").write_text(text)
    with pytest.raises(EdgeYoloError):
        load_bundle(copy)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _leaves(data, path=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(data, list) and data and len(data) < 100:
        for index, value in enumerate(data):
            yield from _leaves(value, path + (index,))
    yield path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_loads_or_is_refused_cleanly(cpu_fp32_bundle, data):
    """Any field replaced by any JSON value (digest renewed): either a valid bundle or one EdgeYoloError."""
    manifest = manifest_of(cpu_fp32_bundle)
    paths = [p for p in _leaves(manifest) if p and p[0] != DIGEST_KEY]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(_JSON)
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        bundle = Bundle(path=cpu_fp32_bundle, manifest=seal(manifest))
        from edgeyolo.manifest import validate_manifest

        validate_manifest(bundle.manifest, "fuzz", {"onnxruntime": None, "openvino": None})
    except EdgeYoloError as exc:
        assert "\n" not in str(exc)
        return
    # accepted: the runtime's readers of the manifest must then work
    from edgeyolo.runtime.preprocess import LetterboxSettings

    LetterboxSettings.from_dict(bundle.manifest["preprocess"])


# --------------------------------------------------------------------------- through the CLI
def test_cli_refuses_tampered_bundles_with_one_line(copy, sample_images):
    (copy / "extra.bin").write_bytes(b"x")
    assert_one_line_error(*run_cli("detect", copy, sample_images[0]), "extra.bin is not part of the bundle")
    (copy / "extra.bin").unlink()
    tamper(copy, lambda m: m["output"].__setitem__("head", "sigmoid"), reseal=False)
    assert_one_line_error(*run_cli("info", copy), "checksum mismatch for manifest.json")


def test_detect_on_a_plain_folder_is_one_line(tmp_path, sample_images):
    assert_one_line_error(*run_cli("detect", tmp_path, sample_images[0]), "not a bundle")


def test_untampered_bundle_still_detects(copy, images):
    dets = edgeyolo.load(copy).detect(images[0])
    assert len(dets) >= 4


def test_commit_checksums_files_in_subfolders(copy, tmp_path):
    """engines/ written at build time (TensorRT on a GPU) is verified like the top level."""
    from edgeyolo.bundle import BundleWriter

    manifest = manifest_of(copy)
    with BundleWriter(tmp_path / "nested") as writer:
        shutil.copyfile(copy / "model.onnx", writer.tmp / "model.onnx")
        (writer.tmp / "engines").mkdir()
        (writer.tmp / "engines" / "x.engine").write_bytes(b"compiled")
        bundle = writer.commit(manifest)
    assert set(bundle.manifest["checksums"]) == {"model.onnx", "engines/x.engine"}
    (bundle.path / "engines" / "x.engine").write_bytes(b"swapped")
    refused(bundle.path, "checksum mismatch for engines/x.engine")


def test_deep_json_cannot_crash_a_process_whose_recursion_limit_was_raised(copy):
    """onnx2tf raises the recursion limit to the C int maximum on import; CPython's C JSON scanner
    then overflows the C stack on a manifest nested 100,000 deep (SIGSEGV). Refused instead."""
    import subprocess
    import sys

    (copy / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    code = ("import sys\nsys.setrecursionlimit(2**31 - 1)\nfrom edgeyolo.bundle import load_bundle\n"
            "from edgeyolo.errors import EdgeYoloError\n"
            f"try:\n    load_bundle({str(copy)!r})\nexcept EdgeYoloError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout
