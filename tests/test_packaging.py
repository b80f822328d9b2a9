"""The built wheel carries the targets/ and calibration/ folders, so a plain `pip install` finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_targets_and_calibration(tmp_path):
    pytest.importorskip("hatchling")  # the build backend (in the dev extra); no network: no build isolation
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("edgeyolo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("targets", "calibration"):
        shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith(f"edgeyolo/_data/{folder}/")}
        on_disk = {p.name for p in (ROOT / folder).iterdir() if p.is_file()}
        assert on_disk and shipped == on_disk, (folder, sorted(shipped), sorted(on_disk))
    assert "edgeyolo/runtime/detector.py" in names and not any(n.startswith("tests/") for n in names)


def test_installed_layout_finds_its_data_folders(tmp_path, monkeypatch):
    """targets.data_dir() looks in edgeyolo/_data first: where the wheel puts the folders."""
    import edgeyolo.targets as targets

    fake = tmp_path / "edgeyolo"
    (fake / "_data" / "targets").mkdir(parents=True)
    (fake / "_data" / "targets" / "only-here.toml").write_text('backend = "onnxruntime"\nprecision = "fp32"\n')
    monkeypatch.setattr(targets, "__file__", str(fake / "targets.py"))
    assert [t.name for t in targets.list_targets()] == ["only-here"]
