"""Weights by name: downloaded once into the cache, checked by sha256; offline errors say what to do."""

from __future__ import annotations

import pytest

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import weights


@pytest.fixture
def local_release(yolov5n_pt, monkeypatch, tmp_path):
    """Point the release URL at a local folder holding the real yolov5n.pt (no network)."""
    release = tmp_path / "release"
    release.mkdir()
    (release / "yolov5n.pt").write_bytes(yolov5n_pt.read_bytes())
    monkeypatch.setattr(weights, "RELEASE_URL", release.as_uri() + "/{name}.pt")
    monkeypatch.setenv("EDGEYOLO_CACHE", str(tmp_path / "cache"))
    return release


def test_name_downloads_once_into_the_cache(local_release, tmp_path):
    path = weights.resolve_weights("yolov5n")
    assert path == tmp_path / "cache" / "weights" / "yolov5n.pt"
    (local_release / "yolov5n.pt").unlink()  # a second call must not need the network
    assert weights.resolve_weights("yolov5n.pt") == path


def test_wrong_sha256_is_refused(local_release, monkeypatch, tmp_path):
    monkeypatch.setitem(weights.OFFICIAL_SHA256, "yolov5n", "0" * 64)
    with pytest.raises(EdgeYoloError, match="wrong sha256"):
        weights.resolve_weights("yolov5n")
    assert not list((tmp_path / "cache" / "weights").glob("*"))


def test_offline_error_names_the_file_to_place(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "RELEASE_URL", (tmp_path / "nowhere").as_uri() + "/{name}.pt")
    monkeypatch.setenv("EDGEYOLO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgeYoloError, match="place that file at .*cache/weights/yolov5s.pt"):
        weights.resolve_weights("yolov5s")


def test_local_paths_always_win(yolov5n_pt):
    assert weights.resolve_weights(str(yolov5n_pt)) == yolov5n_pt


def test_missing_local_path(tmp_path):
    with pytest.raises(EdgeYoloError, match="no such weights file"):
        weights.resolve_weights(str(tmp_path / "sub" / "best.pt"))
