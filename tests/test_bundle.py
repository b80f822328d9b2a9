"""Bundles: self-describing manifest, checksums verified on load, written atomically."""

from __future__ import annotations

import json
import shutil

import pytest

import edgeyolo
from edgeyolo.build import build_bundle
from edgeyolo.bundle import BundleWriter, load_bundle
from edgeyolo.errors import EdgeYoloError


def test_manifest_describes_the_bundle(cpu_fp32_bundle, yolov5n_pt):
    manifest = json.loads((cpu_fp32_bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgeyolo-bundle/1"
    assert manifest["target"]["name"] == "cpu-fp32" and manifest["target"]["precision"] == "fp32"
    assert manifest["input"] == {"name": "images", "shape": [1, 640, 640, 3], "layout": "NHWC", "dtype": "uint8",
                                 "channel_order": "BGR", "dynamic_batch": False, "dynamic_shape": False}
    assert manifest["preprocess"]["imgsz"] == [640, 640] and manifest["preprocess"]["color"] == 114
    assert manifest["preprocess"]["auto"] is False
    out = manifest["output"]
    assert out["head"] == "decoded" and out["shape"] == [1, 25200, 85] and out["strides"] == [8, 16, 32]
    assert len(out["anchors"]) == 3 and len(manifest["names"]) == 80
    assert manifest["backend"]["name"] == "onnxruntime" and manifest["backend"]["version"]
    assert manifest["edgeyolo_version"] == edgeyolo.__version__
    assert manifest["source"]["sha256"] == "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
    assert set(manifest["checksums"]) == {"model.onnx"}


def test_tampered_file_is_refused(cpu_fp32_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cpu_fp32_bundle, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EdgeYoloError, match="checksum mismatch for model.onnx"):
        edgeyolo.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(EdgeYoloError, match="missing"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(EdgeYoloError, match="not a bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(EdgeYoloError, match="corrupt manifest"):
        load_bundle(tmp_path)


def test_failed_build_leaves_the_old_bundle_and_no_debris(cpu_fp32_bundle, yolov5n_pt, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(cpu_fp32_bundle, dest)
    before = (dest / "manifest.json").read_text()

    def exploding_gate(bundle):
        assert (bundle.path / "model.onnx").is_file()  # built, not yet committed
        raise EdgeYoloError("boom")

    with pytest.raises(EdgeYoloError, match="boom"):
        build_bundle(yolov5n_pt, "cpu-fp32", dest, gate=exploding_gate)
    assert (dest / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    load_bundle(dest)


def test_writer_replaces_an_existing_bundle_atomically(tmp_path):
    dest = tmp_path / "bundle"
    for content in ("first", "second"):
        with BundleWriter(dest) as writer:
            (writer.tmp / "engine.bin").write_text(content)
            writer.commit({"backend": {"name": "onnxruntime", "files": {"engine": "engine.bin"}}})
    assert (dest / "engine.bin").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_writer_refuses_to_replace_a_non_bundle_folder(tmp_path):
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "thesis.txt").write_text("do not delete")
    with BundleWriter(dest) as writer, pytest.raises(EdgeYoloError, match="not a bundle"):
        writer.commit({"backend": {"name": "x", "files": {}}})
    assert (dest / "thesis.txt").read_text() == "do not delete"
