"""CI runs with EDGEYOLO_REQUIRE_FIXTURES=1: a missing fixture must fail the run, never skip it green."""

from __future__ import annotations

from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_missing_fixture_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path)
    monkeypatch.setattr(conftest, "REQUIRE_FIXTURES", True)
    with pytest.raises(BaseException) as raised:  # a skip must not pass for the failure expected here
        conftest.fixture_path("weights", "yolov5n.pt")
    assert raised.type is pytest.fail.Exception
    assert "missing (EDGEYOLO_REQUIRE_FIXTURES is set)" in str(raised.value)


def test_missing_fixture_skips_on_a_workstation(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path)
    monkeypatch.setattr(conftest, "REQUIRE_FIXTURES", False)
    with pytest.raises(BaseException) as raised:
        conftest.fixture_path("weights", "yolov5n.pt")
    assert raised.type is pytest.skip.Exception and "not present" in str(raised.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "yolov5n.pt").write_bytes(b"")
    assert conftest.fixture_path("weights", "yolov5n.pt") == tmp_path / "weights" / "yolov5n.pt"


def test_ci_requires_the_fixtures_and_runs_the_readme_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "export EDGEYOLO_REQUIRE_FIXTURES=1" in script
    assert "\npython -m pytest -q\n" in script and "python -m pytest -q" in (ROOT / "README.md").read_text()
