"""``edgeyolo report`` on the real yolov5n at 128 px over a few coco-val-500 images (cpu-fp32 + cpu-int8)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edgeyolo.report import ReportConfig, pareto_front, run_report
from edgeyolo.report.machine import cpuinfo
from edgeyolo.report.rows import verdicts

FILES = ("report.md", "report.json", "pareto.png", "size_vs_map.png", "state.json")


def test_pareto_front_on_synthetic_points():
    # (latency ms, mAP): 1 beats 3 (faster and more accurate); 4 equals 2; 5 is slower than 2 at the same mAP.
    points = [(10, 20), (5, 15), (12, 30), (11, 19), (5, 15), (7, 15), (2, 1)]
    assert pareto_front(points) == [6, 1, 4, 0, 2]
    assert pareto_front([]) == []
    assert pareto_front([(3, 3)]) == [0]


def test_cpuinfo_reads_model_and_flags():
    text = "processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    assert cpuinfo(text) == {"model": "Some CPU @ 2GHz", "flags": ["avx2", "avx512f", "avx512_vnni"]}
    assert cpuinfo("Features\t: fp asimd asimddp\n")["flags"] == ["asimd", "asimddp"]


def test_verdict_picks_the_fastest_row_within_the_budget():
    rows = [{"id": f"m/t/{s}", "model": "m", "target": "t", "imgsz": s, "p50_ms": ms, "fps": 1000 / ms,
             "map50_95": 30 - d, "drop_vs_reference": d, "error": None}
            for s, ms, d in ((640, 40.0, 0.0), (512, 30.0, 0.8), (320, 10.0, 5.0))]
    assert verdicts(rows, 1.0)[0]["pick"] == "m/t/512"
    assert verdicts(rows, 0.5)[0]["pick"] == "m/t/640"
    assert verdicts(rows, -1)[0]["pick"] is None


@pytest.fixture(scope="module")
def broken_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "broken.toml"
    path.write_text('name = "broken"\nprecision = "fp32"\n')  # no backend
    return path


@pytest.fixture(scope="module")
def config(yolov5n_pt, coco_val, coco128, broken_target, tmp_path_factory):
    return ReportConfig(models=[str(yolov5n_pt)], targets=["cpu-fp32", "cpu-int8", str(broken_target)],
                        data=str(coco_val), out=str(tmp_path_factory.mktemp("report") / "r"), sizes=[128],
                        calib=str(coco128 / "images"), calib_size=8, rounds=1, iters=3, warmup=1, limit=3)


@pytest.fixture(scope="module")
def report(config):
    return run_report(config)


@pytest.mark.slow  # builds two bundles, evaluates and benchmarks them (~20 s idle, ~90 s loaded)
def test_report_writes_every_file_and_measures_each_bundle(config, report):
    for name in FILES:
        assert (config.out and os.path.getsize(os.path.join(config.out, name))) > 0, name
    rows = {r["target"]: r for r in report["rows"]}
    assert list(rows) == ["cpu-fp32", "cpu-int8", "broken"]
    for target in ("cpu-fp32", "cpu-int8"):
        row = rows[target]
        assert row["error"] is None, row
        assert 0 < row["map50"] <= 100 and 0 <= row["map50_95"] <= row["map50"]
        assert row["fps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["peak_rss_mb"] > 10
        assert row["params_m"] == pytest.approx(1.87, abs=0.01) and 0 < row["gflops"] < 1
        assert row["size_mb"] > 0 and row["build_s"] > 0 and row["rounds"] == 1
    assert rows["cpu-fp32"]["drop"] == 0
    assert rows["cpu-int8"]["drop"] == pytest.approx(rows["cpu-fp32"]["map50_95"] - rows["cpu-int8"]["map50_95"],
                                                     abs=0.011)
    assert rows["cpu-int8"]["size_mb"] < rows["cpu-fp32"]["size_mb"]
    saved = json.loads(open(os.path.join(config.out, "report.json")).read())
    assert saved["rows"] == report["rows"] and saved["machine"]["logical_cores"] == os.cpu_count()
    markdown = open(os.path.join(config.out, "report.md")).read()
    assert "| yolov5n | cpu-int8 | int8 | 128 |" in markdown and "## Verdict" in markdown


@pytest.mark.slow  # builds two bundles, evaluates and benchmarks them (~20 s idle, ~90 s loaded)
def test_a_target_that_fails_to_build_is_a_row_with_its_reason(report):
    broken = report["rows"][-1]
    assert "backend" in broken["error"] and broken["map50_95"] is None and broken["bundle"] is None
    assert any(v["target"] == "broken" and v["pick"] is None for v in report["verdicts"])


def test_int8_without_calibration_is_a_reason_not_a_crash(yolov5n_pt, tmp_path):
    from edgeyolo.report.builder import ensure_bundle
    from edgeyolo.report.plan import CalibSpec, plan_cells

    cell = plan_cells([str(yolov5n_pt)], ["cpu-int8"], [128])[1]
    outcome = ensure_bundle(cell, tmp_path, CalibSpec())
    assert outcome.bundle is None and "--calib" in outcome.error
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())


@pytest.mark.slow  # builds two bundles, evaluates and benchmarks them (~20 s idle, ~90 s loaded)
def test_rerun_does_not_rebuild_but_measures_again(config, report, monkeypatch):
    import edgeyolo.build

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached bundle")

    monkeypatch.setattr(edgeyolo.build, "build_bundle", no_build)
    rerun = run_report(config)
    for before, after in zip(report["rows"][:2], rerun["rows"][:2]):
        assert after["cached"] and after["error"] is None and after["rounds"] == 1
        assert after["map50_95"] == before["map50_95"] and after["build_s"] == before["build_s"]


@pytest.mark.slow  # builds two bundles, evaluates and benchmarks them (~20 s idle, ~90 s loaded)
def test_an_interrupted_report_resumes_where_it_stopped(config, report, tmp_path, monkeypatch):
    import edgeyolo.compare

    out = tmp_path / "copy"
    shutil.copytree(config.out, out, ignore=shutil.ignore_patterns("state.json", "report.*"))
    settings = {**config.__dict__, "out": str(out)}
    real, calls = edgeyolo.compare.bench_in_subprocess, []

    def interrupted_at_the_second(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(edgeyolo.compare, "bench_in_subprocess", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_report(ReportConfig(**settings))
    assert not (out / "report.md").exists()
    saved = json.loads((out / "state.json").read_text())["cells"]
    assert sorted(len(c.get("bench", [])) for c in saved.values()) == [0, 0, 1]

    calls.clear()
    resumed = run_report(ReportConfig(**{**settings, "resume": True}))
    assert len(calls) == 1  # only the second bundle, not measured before the interruption
    assert [r["rounds"] for r in resumed["rows"][:2]] == [1, 1]
    with pytest.raises(Exception, match="rerun without --resume"):
        run_report(ReportConfig(**{**settings, "resume": True, "iters": 7}))


def test_cli_bad_sizes_and_missing_model_get_one_line(tmp_path, coco_val):
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    for args, pattern in ((["yolov5n.pt", "--imgsz", "32,abc"], "Invalid value"),
                          ([str(tmp_path / "missing.pt")], "missing.pt")):
        result = CliRunner().invoke(cli, ["report", *args, "--targets", "cpu-fp32", "--data", str(coco_val),
                                          "-o", str(tmp_path / "r")])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert pattern in result.output and "Traceback" not in result.output
        assert not (tmp_path / "r" / "report.md").exists()
