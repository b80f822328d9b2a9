"""CI runs with EDGEYOLO_REQUIRE_FIXTURES=1: a missing fixture must fail the run, never skip it green."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
A_TEST_THAT_NEEDS_IMAGES = "tests/test_runtime.py::test_letterbox_matches_upstream_geometry"


def _pytest(tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "EDGEYOLO_REQUIRE_FIXTURES"}
    full_env.update(EDGEYOLO_FIXTURES=str(tmp_path / "nowhere"), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", A_TEST_THAT_NEEDS_IMAGES],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_missing_fixtures_fail_when_required(tmp_path):
    result = _pytest(tmp_path, EDGEYOLO_REQUIRE_FIXTURES="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "missing (EDGEYOLO_REQUIRE_FIXTURES is set)" in result.stdout


def test_missing_fixtures_skip_on_a_workstation(tmp_path):
    result = _pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout


def test_ci_requires_the_fixtures_and_runs_the_readme_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "export EDGEYOLO_REQUIRE_FIXTURES=1" in script
    assert "\npython -m pytest -q\n" in script and "python -m pytest -q" in (ROOT / "README.md").read_text()
