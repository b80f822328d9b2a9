"""Calibration sets: sources (folder, list file, named set), sampling, skipped files, manifest facts,
and the bad inputs of `edgeyolo build --calib` (one line, exit status 2, no bundle)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeyolo.calibration import fetch_named_set, images_digest, load_calibration, named_set_file
from edgeyolo.errors import EdgeYoloError
from edgeyolo.runtime.preprocess import LetterboxSettings, preprocess

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SMALL = LetterboxSettings(imgsz=(320, 320))


@pytest.fixture(scope="module")
def coco128_images(coco128) -> list[Path]:
    return sorted((coco128 / "images").glob("*.jpg"))


@pytest.fixture
def mixed_folder(tmp_path, coco128_images) -> Path:
    """Eight real images, two corrupt ``.jpg`` files and a non-image file."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for image in coco128_images[:4]:
        shutil.copy(image, folder / image.name)
    for image in coco128_images[4:8]:
        shutil.copy(image, folder / "sub" / image.name)  # folders are searched recursively
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No network: every URL goes to a proxy on a closed local port (nothing is downloaded)."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEYOLO_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- sampling and facts
def test_folder_skips_and_counts_corrupt_files(mixed_folder):
    calib = load_calibration(mixed_folder, SMALL, size=None)
    assert len(calib) == 8 and len(calib.images) == 8
    assert calib.candidates == 10  # eight images and two broken .jpg files; notes.txt is no candidate
    assert sorted(Path(p).name for p, _ in calib.skipped) == ["broken.jpg", "empty.jpg"]
    facts = calib.describe()
    assert facts["images"] == 8 and facts["skipped"] == 2 and facts["candidates"] == 10
    expected = images_digest([hashlib.sha256(p.read_bytes()).hexdigest() for p in calib.images])
    assert facts["images_sha256"] == expected
    assert facts["preprocess"] == SMALL.to_dict()


def test_sampling_is_reproducible_and_seeded(coco128):
    first = load_calibration(coco128 / "images", SMALL, size=20, seed=1)
    again = load_calibration(coco128 / "images", SMALL, size=20, seed=1)
    other = load_calibration(coco128 / "images", SMALL, size=20, seed=2)
    assert first.images == again.images and len(first) == 20
    assert first.images != other.images
    assert first.describe()["images_sha256"] == again.describe()["images_sha256"]
    assert first.describe()["images_sha256"] != other.describe()["images_sha256"]
    assert first.describe()["seed"] == 1


def test_image_order_on_disk_does_not_change_the_digest(coco128_images):
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in coco128_images[:5]]
    assert images_digest(hashes) == images_digest(hashes[::-1])


def test_batches_are_the_runtime_preprocessing(coco128_images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# calibration list\n" + "\n".join(str(p) for p in coco128_images[:3]) + "\n\n")
    calib = load_calibration(listing, SMALL, size=3)
    batches = list(calib.batches("NCHW", batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 320, 320), (1, 3, 320, 320)]
    assert batches[0].dtype == np.float32 and 0.0 <= batches[0].min() and batches[0].max() <= 1.0
    for image_path, row in zip(calib.images, np.concatenate(batches)):
        import cv2

        expected, _ = preprocess(cv2.imread(str(image_path)), SMALL)
        np.testing.assert_array_equal(row, expected[0])
    nhwc = next(calib.batches("NHWC"))
    np.testing.assert_array_equal(nhwc[0], batches[0][0].transpose(1, 2, 0))


def test_list_file_paths_are_relative_to_the_file(coco128_images, tmp_path):
    for image in coco128_images[:2]:
        shutil.copy(image, tmp_path / image.name)
    listing = tmp_path / "calib.txt"
    listing.write_text("\n".join(p.name for p in coco128_images[:2]))
    calib = load_calibration(listing, SMALL, size=2)
    assert sorted(p.name for p in calib.images) == sorted(p.name for p in coco128_images[:2])


def test_default_size_uses_every_image_with_a_warning(mixed_folder, caplog, monkeypatch):
    from edgeyolo.log import log

    monkeypatch.setattr(log, "propagate", True)  # the CLI, once invoked, routes warnings to its own handler
    with caplog.at_level("WARNING", logger="edgeyolo"):
        calib = load_calibration(mixed_folder, SMALL)
    assert len(calib) == 8
    assert "only 8 usable images" in caplog.text
    assert "100 or more" in caplog.text  # fewer than the recommended minimum


# --------------------------------------------------------------------------- bad sources
def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(EdgeYoloError, match="no image files"):
        load_calibration(tmp_path, SMALL)


def test_folder_of_unreadable_images_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(EdgeYoloError, match="no readable calibration images"):
        load_calibration(tmp_path, SMALL)


def test_fewer_usable_images_than_an_explicit_size_is_an_error(mixed_folder):
    with pytest.raises(EdgeYoloError, match="only 8 usable calibration images, but --calib-size 9"):
        load_calibration(mixed_folder, SMALL, size=9)


def test_unknown_source_names_the_named_sets(tmp_path):
    with pytest.raises(EdgeYoloError, match="coco128"):
        load_calibration("no-such-set", SMALL)


# --------------------------------------------------------------------------- named sets
def test_named_set_offline_names_the_file_to_place(fresh_cache, offline):
    with pytest.raises(EdgeYoloError) as error:
        fetch_named_set("coco128")
    message = str(error.value)
    assert str(fresh_cache / "calibration" / "coco128.zip") in message
    assert str(fresh_cache / "calibration" / "coco128") in message
    assert "\n" not in message
    assert not (fresh_cache / "calibration" / "coco128").exists()
    assert not list((fresh_cache / "calibration").glob("*.part"))


def test_named_set_in_the_cache_works_offline(fresh_cache, offline, coco128_images):
    folder = fresh_cache / "calibration" / "coco128" / "images"
    folder.mkdir(parents=True)
    for image in coco128_images:
        (folder / image.name).symlink_to(image)
    calib = load_calibration("coco128", SMALL, size=128)
    spec = tomllib.loads(named_set_file("coco128").read_text())
    assert len(calib) == spec["images"] == 128
    assert calib.describe()["images_sha256"] == spec["images_sha256"]
    assert calib.describe()["source"] == "coco128"


def test_named_set_with_other_images_is_refused(fresh_cache, coco128_images):
    folder = fresh_cache / "calibration" / "coco128"
    folder.mkdir(parents=True)
    for image in coco128_images[:5]:
        (folder / image.name).symlink_to(image)
    with pytest.raises(EdgeYoloError, match="do not match the coco128 set"):
        fetch_named_set("coco128")


# --------------------------------------------------------------------------- the CLI: exit 2, no bundle
def _build_int8(args, out: Path):
    from edgeyolo.cli import cli

    return CliRunner().invoke(cli, ["build", *args, "-t", "intel-cpu-int8", "-o", str(out)])


def _assert_one_line_error_and_no_bundle(result, out: Path, *needles: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in result.output.replace("\n", "")
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "no image files"),
    (lambda d: (d / "readme.txt").write_text("hello"), "no image files"),
    (lambda d: (d / "a.jpg").write_bytes(b"junk"), "no readable calibration images"),
], ids=["empty", "non-image", "unreadable"])
def test_cli_bad_calibration_folder(yolov5n_pt, tmp_path, make, needle):
    folder = tmp_path / "calib"
    folder.mkdir()
    make(folder)
    out = tmp_path / "bundle"
    result = _build_int8([str(yolov5n_pt), "--calib", str(folder)], out)
    _assert_one_line_error_and_no_bundle(result, out, needle)


def test_cli_fewer_images_than_calib_size(yolov5n_pt, mixed_folder, tmp_path):
    out = tmp_path / "bundle"
    result = _build_int8([str(yolov5n_pt), "--calib", str(mixed_folder), "--calib-size", "50"], out)
    _assert_one_line_error_and_no_bundle(result, out, "only 8 usable calibration images", "--calib-size 50")


def test_cli_named_set_offline(yolov5n_pt, tmp_path, fresh_cache, offline):
    out = tmp_path / "bundle"
    result = _build_int8([str(yolov5n_pt), "--calib", "coco128"], out)
    _assert_one_line_error_and_no_bundle(result, out, str(fresh_cache / "calibration" / "coco128.zip"))


def test_cli_int8_without_calibration(yolov5n_pt, tmp_path):
    out = tmp_path / "bundle"
    result = _build_int8([str(yolov5n_pt)], out)
    _assert_one_line_error_and_no_bundle(result, out, "--calib")


def test_a_targets_calibration_size_is_a_default_not_a_demand(yolov5n_pt, coco128, caplog):
    """A target asking for 300 images still calibrates on a 128-image set (with a warning)."""
    import logging

    from edgeyolo.build import prepare_calibration
    from edgeyolo.targets import Target

    target = Target(name="t", backend="onnxruntime", precision="int8", calibration={"size": 300, "seed": 0})
    with caplog.at_level(logging.WARNING, logger="edgeyolo"):
        calib = prepare_calibration(yolov5n_pt, target, coco128 / "images")
    assert len(calib) == 128 and "using all of them" in caplog.text
    with pytest.raises(EdgeYoloError, match="--calib-size 300"):
        prepare_calibration(yolov5n_pt, target, coco128 / "images", size=300)
