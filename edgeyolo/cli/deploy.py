"""Commands that make artifacts: targets, export, build (with its accuracy gate), info."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..errors import EdgeYoloError
from ..log import log
from .common import IMGSZ, cli, err, out, print_json, progress_bar


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets(as_json: bool):
    """List the target profiles (files in targets/)."""
    from ..targets import list_targets

    items = list_targets()
    if as_json:
        return print_json([t.to_dict() for t in items])
    table = Table("target", "backend", "precision", "imgsz", "description")
    for t in items:
        table.add_row(t.name, t.backend, t.precision, "x".join(map(str, t.imgsz)), t.description)
    out.print(table)


@cli.command()
@click.argument("weights")
@click.option("--imgsz", type=IMGSZ, default="640", show_default=True, help="Input size: 640, or height,width (480,640 or 480x640).")
@click.option("--opset", type=click.IntRange(11, 20), default=17, show_default=True)
@click.option("--head", type=click.Choice(["decoded", "sigmoid"]), default="decoded", show_default=True,
              help="decoded: boxes in pixels (YOLOv5's layout); sigmoid: decode on the host (for INT8).")
@click.option("--dynamic-batch", is_flag=True, help="Dynamic batch dimension.")
@click.option("--dynamic-shape", is_flag=True, help="Dynamic batch, height and width.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [default: WEIGHTS stem + .onnx].")
def export(weights, imgsz, opset, head, dynamic_batch, dynamic_shape, output):
    """Export WEIGHTS (a .pt or a name such as yolov5s) to a simplified, tagged ONNX file."""
    from ..export import ExportOptions, export_onnx
    from ..model import load_model

    checkpoint = load_model(weights)
    target = Path(output or Path(weights).with_suffix(".onnx").name)
    options = ExportOptions(imgsz=imgsz, opset=opset,
                            head=head, dynamic_batch=dynamic_batch, dynamic_shape=dynamic_shape)
    path = export_onnx(checkpoint.model, target, options)
    err.print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")


@cli.command()
@click.argument("weights")
@click.option("-t", "--target", "target_name", help="Target name (see 'edgeyolo targets') or .toml path.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Bundle folder [default: WEIGHTS stem-TARGET].")
@click.option("--imgsz", type=IMGSZ, help="Override the target's input size: 640, or height,width (480,640 or 480x640).")
@click.option("--calib", help="Calibration images for INT8: a folder, a text file of paths, or a named set.")
@click.option("--calib-size", type=click.IntRange(min=1), help="Calibration images to draw [default: 300].")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed for drawing calibration images.")
@click.option("--val", help="Evaluate the built engine on this labelled dataset before committing it.")
@click.option("--max-drop", type=float, default=0.5, show_default=True,
              help="With --val: the largest allowed mAP50-95 drop, in points, versus cpu-fp32.")
@click.option("--keep-float", help="INT8: layers left in float: auto (the target's), none, N (the N most "
              "sensitive, ranked now) or names (model.1,model.4; see 'edgeyolo sensitivity').")
def build(weights, target_name, output, imgsz, calib, calib_size, calib_seed, val, max_drop, keep_float):
    """Compile WEIGHTS for a target into a bundle folder (engine + manifest.json).

    WEIGHTS may also be a portable bundle (e.g. jetson-int8 built on a workstation):
    its engine is then compiled here, on the device, and cached beside it.
    """
    from ..bundle import is_bundle

    if is_bundle(weights):  # on the device: no torch there, so nothing from ..build
        from ..portable import compile_portable

        engine = compile_portable(weights, calib, calib_size, calib_seed)
        err.print(f"compiled {engine} for this device", highlight=False)
        return
    from ..build import BuildOptions, build_bundle, prepare_calibration
    from ..gate import accuracy_gate
    from ..progress import step
    from ..targets import load_target

    if not target_name:
        raise EdgeYoloError("pass --target (see 'edgeyolo targets')")
    if not 0 <= max_drop < float("inf"):  # nan would pass every gate
        raise EdgeYoloError(f"--max-drop must be a number of points >= 0, not {max_drop}")
    target = load_target(target_name)
    dest = Path(output or f"{Path(weights).stem}-{target.name}")
    size = imgsz
    calibration = None
    reference = weights
    learned = _learned_ranges(weights, target)
    if calib and not target.needs_calibration:
        log.warning("target %s is %s; --calib is ignored", target.name, target.precision)
    if keep_float and not target.needs_calibration:
        raise EdgeYoloError(f"--keep-float is for INT8 targets; {target.name} is {target.precision}")
    elif learned is not None:
        from ..optimize.qat.learned import reference_weights

        if keep_float:
            raise EdgeYoloError("--keep-float does not apply to a QAT checkpoint: its float layers were fixed "
                                "when it was trained (edgeyolo qat --keep-float)")
        if calib:
            log.warning("%s is a QAT checkpoint: its learned ranges are used and --calib is ignored", weights)
        calibration, target = learned, _with_learned(target, learned)
        reference = reference_weights(learned, weights)
    elif target.needs_calibration:
        if not calib:
            raise EdgeYoloError(f"target {target.name} is INT8: pass calibration images with --calib")
        with step(f"loading calibration images from {calib}"):
            calibration = prepare_calibration(weights, target, calib, calib_size, calib_seed, size)
        from ..sensitivity import resolve_keep_float

        target = resolve_keep_float(keep_float, weights, target, calibration)
    gate = accuracy_gate(reference, val, max_drop, progress_bar, _report_accuracy) if val else None
    bundle = build_bundle(weights, target, dest, BuildOptions(imgsz=size), calibration=calibration, gate=gate)
    files = ", ".join(f"{name} ({(bundle.path / name).stat().st_size / 1e6:.1f} MB)" for name in bundle.manifest["checksums"])
    err.print(f"built [bold]{bundle.path}[/] for {target.name}: {files}", highlight=False)


def _learned_ranges(weights, target):
    """A QAT checkpoint's learned ranges where ``target`` can take them (None otherwise, said in one line)."""
    if not target.needs_calibration:
        return None
    from ..optimize.qat.learned import learned_ranges_for

    learned = learned_ranges_for(weights)
    if learned is not None and learned.asymmetric and target.backend == "tensorrt":
        raise EdgeYoloError(f"{weights}: this QAT checkpoint learned asymmetric activations (trained for an "
                            f"ONNX Runtime target); {target.name} (TensorRT) takes symmetric ones only: "
                            "train with edgeyolo qat --target jetson-int8")
    if learned is not None and target.backend == "tflite":
        err.print(f"{target.name}: onnx2tf quantises on its own and cannot take a QAT checkpoint's learned ranges; "
                  f"applying the target's PTQ recipe to its (QAT-trained) float weights on --calib", highlight=False)
        return None
    return learned


def _with_learned(target, learned):
    """``target`` as the QAT graph was trained: its float layers, and TensorRT compiling the Q/DQ ONNX."""
    import dataclasses as dc

    backend_options = dict(target.backend_options)
    if target.backend == "tensorrt":
        backend_options["int8_calibration"] = "explicit"  # implicit INT8 would calibrate again
    return dc.replace(target, calibration={**target.calibration, "keep_float": learned.keep_float},
                      backend_options=backend_options)


def _report_accuracy(acc: dict) -> None:
    table = Table("", "target", "mAP50-95", "mAP50", title=f"accuracy on {acc['data']} ({acc['images']} images)")
    for role in ("reference", "this"):
        r = acc[role]
        table.add_row(role, r["target"], f"{r['map50_95'] * 100:.2f}", f"{r['map50'] * 100:.2f}")
    err.print(table)
    verdict = "[green]pass[/]" if acc["passed"] else "[red]FAIL[/]"
    err.print(f"drop {acc['drop_points']:.2f} points (max {acc['max_drop_points']}): {verdict}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def info(bundle, as_json):
    """Show a bundle's manifest (and verify its checksums)."""
    from ..bundle import load_bundle

    b = load_bundle(bundle)
    if as_json:
        return print_json(b.manifest)
    m = b.manifest
    out.print(f"[bold]{b.path}[/]: target {m['target']['name']} ({m['backend']['name']} {m['target']['precision']})")
    out.print(f"input {m['input']['shape']} {m['input']['layout']} {m['input']['dtype']}, head {m['output']['head']}, "
              f"{len(m['names'])} classes")
    if m.get("calibration"):
        c = m["calibration"]
        out.print(f"calibration: {c['images']} images from {c['source']} ({c.get('method') or 'default'})")
    if m.get("accuracy"):
        a = m["accuracy"]
        out.print(f"accuracy: mAP50-95 {a['this']['map50_95'] * 100:.2f} (reference {a['reference']['map50_95'] * 100:.2f})")
    out.print("checksums verified")
