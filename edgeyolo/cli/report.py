"""``edgeyolo report``: many builds, evals and benches side by side, as tables and plots."""

from __future__ import annotations

from contextlib import nullcontext

import click
from rich.live import Live
from rich.table import Table

from ..errors import EdgeYoloError
from .common import cli, err


def _int_list(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 32:
        raise click.BadParameter("give image sizes of at least 32, e.g. 320,640")
    return sizes


def _live_table(rows: list[dict], message: str, rounds: int) -> Table:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    table = Table(title=message, title_justify="left")
    for name in ("model", "target", "size", "mAP50-95", "drop", "FPS", "p50 ms", "RSS MB"):
        table.add_column(name, no_wrap=True)
    table.add_column("status", overflow="ellipsis", no_wrap=True)
    for r in rows:
        if r["error"]:
            status = f"[red]{r['error'][:50]}[/]"
        else:
            status = ("cached" if r["cached"] else "") + (f" {r['rounds']}/{rounds}" if r["rounds"] else "")
        table.add_row(r["model"], r["target"], str(r["imgsz"]), fmt(r["map50_95"]), fmt(r["drop"], "{:+.2f}"),
                      fmt(r["fps"], "{:.1f}"), fmt(r["p50_ms"], "{:.1f}"), fmt(r["peak_rss_mb"], "{:.0f}"),
                      status.strip())
    return table


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--targets", "targets", required=True, help="Comma-separated target names or .toml paths.")
@click.option("--data", required=True, help="Labelled dataset to evaluate every bundle on.")
@click.option("--calib", help="Calibration images for the INT8 targets (folder, list file or named set).")
@click.option("--calib-size", type=click.IntRange(min=1), help="Calibration images to draw [default: the target's].")
@click.option("--imgsz", default="640", show_default=True, help="Comma-separated square input sizes, e.g. 320,640.")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Accuracy budget for the verdict: mAP50-95 points below the reference.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Benchmark rounds, bundles taking turns, each in a fresh process.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Timed frames per round.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate on the first N images only.")
@click.option("--resume", is_flag=True, help="Continue an interrupted report in REPORT_DIR.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="REPORT_DIR.")
def report(models, targets, data, calib, calib_size, imgsz, max_drop, rounds, iters, limit, resume, output):
    """Build, evaluate and benchmark every MODEL on every target and size; write report.md, report.json and plots.

    MODELS are weights (a .pt, a name such as yolov5n, or our own checkpoint: pruned, distilled ...).
    Bundles are cached in REPORT_DIR/bundles by content, so a rerun only measures.
    """
    from ..report import ReportConfig, run_report

    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    if not target_list:
        raise EdgeYoloError("--targets: give at least one target")
    config = ReportConfig(models=list(models), targets=target_list, data=data, out=output, sizes=_int_list(imgsz),
                          calib=calib, calib_size=calib_size, max_drop=max_drop, rounds=rounds, iters=iters,
                          limit=limit, resume=resume)
    live = Live(console=err, auto_refresh=False, transient=False) if err.is_terminal else nullcontext()
    with live:
        def on_update(rows, message):
            if err.is_terminal:
                live.update(_live_table(rows, message, rounds), refresh=True)
            else:
                err.print(message, highlight=False)

        result = run_report(config, on_update=on_update)
    for v in result["verdicts"]:
        err.print(f"{v['target']}: " + (f"{v['model']} at {v['imgsz']} ({v['p50_ms']:.1f} ms, "
                                          f"mAP50-95 {v['map50_95']:.2f})" if v["pick"] else f"none ({v['reason']})"),
                  highlight=False)
    err.print(f"wrote {output}/report.md, report.json, pareto.png, size_vs_map.png", highlight=False)
