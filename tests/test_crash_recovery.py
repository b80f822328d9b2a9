"""Builds killed with SIGKILL: never a missing bundle, and the next build cleans what the dead one left.

The commit's worst moments are hit exactly by child processes that SIGKILL themselves there
(between the two renames of the fallback, right after the atomic exchange); a real CLI build
is also killed mid-export. Bundles get the user's umask like any other output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeyolo.bundle import BundleWriter, load_bundle
from edgeyolo.swap import exchange

ROOT = Path(__file__).resolve().parents[1]

# A child that commits a bundle over DEST and SIGKILLs itself at the chosen point of the commit.
_CHILD = textwrap.dedent("""
    import json, os, shutil, signal, sys
    from pathlib import Path
    import edgeyolo.swap as swap
    from edgeyolo.bundle import BundleWriter

    source, dest, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_rename, real_rmtree = os.rename, shutil.rmtree
    if point == "between-renames":
        swap.exchange = lambda a, b: False          # a system without renameat2
        calls = []
        def rename(a, b):
            real_rename(a, b)
            calls.append(a)
            if len(calls) == 1:
                die()                               # old parked, new not yet in place
        swap.os.rename = rename
    elif point == "after-exchange":
        swap.shutil.rmtree = lambda *a, **k: die()  # swapped, old copy not yet removed
    manifest = json.loads((source / "manifest.json").read_text())
    with BundleWriter(dest) as writer:
        shutil.copyfile(source / "model.onnx", writer.tmp / "model.onnx")
        (writer.tmp / "model.onnx").open("ab").write(b"")
        if point == "before-commit":
            die()
        writer.commit({k: v for k, v in manifest.items() if k not in ("checksums", "manifest_sha256")})
""")


def _commit_and_die(source: Path, dest: Path, point: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(dest), point], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.returncode


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def existing(cpu_fp32_bundle, tmp_path) -> Path:
    dest = tmp_path / "out" / "bundle"
    shutil.copytree(cpu_fp32_bundle, dest)
    (dest / "manifest.json").touch()
    return dest


def test_kill_between_the_two_renames_is_recovered_on_open(existing, cpu_fp32_bundle):
    before = (existing / "manifest.json").read_text()
    _commit_and_die(cpu_fp32_bundle, existing, "between-renames")
    assert not existing.exists() and any(n.startswith(".bundle.old-") for n in _debris(existing.parent))
    bundle = load_bundle(existing)  # recovers the parked bundle
    assert (bundle.path / "manifest.json").read_text() == before
    assert not any(n.startswith(".bundle.old-") for n in _debris(existing.parent))  # the rest: the next build's


def test_kill_between_the_two_renames_is_recovered_by_the_next_build(existing, cpu_fp32_bundle):
    _commit_and_die(cpu_fp32_bundle, existing, "between-renames")
    with BundleWriter(existing) as writer:
        assert existing.is_dir() and not any(n.startswith(".bundle.old-") for n in _debris(existing.parent))
        (writer.tmp / "engine.bin").write_bytes(b"new")
        writer.commit({})
    assert (existing / "engine.bin").read_bytes() == b"new"
    assert _debris(existing.parent) == []


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_kill_right_after_the_exchange_leaves_the_new_bundle(existing, cpu_fp32_bundle):
    _commit_and_die(cpu_fp32_bundle, existing, "after-exchange")
    load_bundle(existing)  # the new one, complete
    assert any(n.startswith(".bundle.building-") for n in _debris(existing.parent))  # the old copy, parked
    with BundleWriter(existing):
        pass
    assert _debris(existing.parent) == []


def test_kill_before_commit_keeps_the_old_bundle_and_the_next_build_cleans(existing, cpu_fp32_bundle):
    before = (existing / "manifest.json").read_text()
    _commit_and_die(cpu_fp32_bundle, existing, "before-commit")
    assert (existing / "manifest.json").read_text() == before
    assert any(n.startswith(".bundle.building-") for n in _debris(existing.parent))
    with BundleWriter(existing):
        pass
    assert _debris(existing.parent) == []


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.slow
def test_real_build_killed_mid_export_leaves_the_old_bundle_and_is_cleaned(existing, yolov5n_pt, tmp_path):
    """SIGKILL a real ``edgeyolo build`` while it exports; the next build removes its work folders."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    before = (existing / "manifest.json").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    command = [sys.executable, "-m", "edgeyolo.cli", "build", str(yolov5n_pt), "-t", "cpu-fp32", "-o", str(existing)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(temp.glob("edgeyolo-export-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert (existing / "manifest.json").read_text() == before
    assert list(temp.glob(f"edgeyolo-export-{proc.pid}-*"))
    assert any(n.startswith(f".bundle.building-{proc.pid}-") for n in _debris(existing.parent))

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    load_bundle(existing)
    assert list(temp.glob("edgeyolo-*")) == [] and _debris(existing.parent) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_bundle_gets_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with BundleWriter(tmp_path / f"b{umask:o}") as writer:
            (writer.tmp / "engine.bin").write_bytes(b"x")
            bundle = writer.commit({})
    finally:
        os.umask(old)
    assert bundle.path.stat().st_mode & 0o777 == mode
    assert (bundle.path / "manifest.json").stat().st_mode & 0o777 == mode & 0o666
