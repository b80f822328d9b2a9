"""INT8 analysis commands: ``sensitivity`` (which layers to keep in float)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import EdgeYoloError
from .common import cli, err, progress_bar


@cli.command()
@click.argument("weights")
@click.option("-t", "--target", "target_name", required=True, help="An INT8 target (its calibration settings).")
@click.option("--calib", required=True, help="Calibration images: a folder, a text file of paths, or a named set.")
@click.option("--calib-size", type=int, help="Calibration images to draw [default: the target's, or 300].")
@click.option("--val", required=True, help="Images to measure on (a folder or dataset; labels are not needed).")
@click.option("--limit", type=int, default=32, show_default=True, help="Images drawn from --val.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing the --val images.")
@click.option("--layers", help="Only these blocks, comma-separated (e.g. model.1,model.4) [default: all].")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="sensitivity", show_default=True,
              help="Folder for sensitivity.json, sensitivity.md and sensitivity.png.")
def sensitivity(weights, target_name, calib, calib_size, val, limit, seed, layers, output):
    """Rank WEIGHTS' layers by how much INT8 error keeping each one in float removes.

    Each block in turn stays float while the rest is INT8 (the target's recipe); the measure is
    the objectness-weighted error of the head's outputs against FP32 on --val images. Feed the
    top names to `edgeyolo build --keep-float`.
    """
    from ..build import prepare_calibration
    from ..sensitivity import letterboxed_inputs, sensitivity_for, write_report
    from ..targets import load_target

    target = load_target(target_name)
    if target.precision != "int8":
        raise EdgeYoloError(f"target {target.name} is {target.precision}; sensitivity needs an INT8 target")
    if limit < 1:
        raise EdgeYoloError(f"--limit must be positive, not {limit}")
    calibration = prepare_calibration(weights, target, calib, calib_size)
    inputs = letterboxed_inputs(val, weights, target, limit, seed)
    candidates = [name.strip() for name in layers.split(",") if name.strip()] if layers else None
    report = sensitivity_for(weights, target, calibration, inputs, progress_bar, candidates)
    paths = write_report(report, Path(output))
    top = ", ".join(f"{s.layer} ({s.recovered * 100:.0f} %)" for s in report.scores[:5])
    err.print(f"most sensitive: {top}", highlight=False)
    err.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False)
