"""The ``edgeyolo`` command: click commands and progress bars; the work happens in the library."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ._version import __version__
from .errors import EdgeYoloError
from .log import log

# Tables keep their shape when piped to a file or a log.
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
out = Console() if sys.stdout.isatty() else Console(width=160)


class _OneLineErrors(click.Group):
    """Turn ``EdgeYoloError`` into one clear line on stderr and exit status 2 (1 for a failed accuracy gate)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeYoloError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)


class _WarningHandler(logging.Handler):
    def emit(self, record):
        level = record.levelname.lower()
        style = {"warning": "yellow", "error": "red"}.get(level, "dim")
        err.print(f"[{style}]{level}:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeyolo")
@click.option("-v", "--verbose", is_flag=True, help="Also print progress notes.")
def cli(verbose: bool):
    """Compile YOLOv5 detectors for edge targets, then detect, evaluate and benchmark them."""
    log.handlers[:] = [_WarningHandler()]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


@contextmanager
def progress_bar(label: str, total: int):
    """A rich progress bar on stderr; yields ``advance(n)``."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


def _open_model(spec):
    """A bundle folder as is; weights are built into a cached cpu-fp32 bundle (torch is imported only then)."""
    from .bundle import is_bundle, load_bundle

    if is_bundle(spec):
        return load_bundle(spec)
    from .build import cached_reference_bundle

    return cached_reference_bundle(spec)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


# --------------------------------------------------------------------------- targets
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets(as_json: bool):
    """List the target profiles (files in targets/)."""
    from .targets import list_targets

    items = list_targets()
    if as_json:
        return _print_json([t.to_dict() for t in items])
    table = Table("target", "backend", "precision", "imgsz", "description")
    for t in items:
        table.add_row(t.name, t.backend, t.precision, "x".join(map(str, t.imgsz)), t.description)
    out.print(table)


# --------------------------------------------------------------------------- export
@cli.command()
@click.argument("weights")
@click.option("--imgsz", type=int, multiple=True, default=(640,), show_default=True, help="Input size (h [w]).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--head", type=click.Choice(["decoded", "sigmoid"]), default="decoded", show_default=True,
              help="decoded: boxes in pixels (YOLOv5's layout); sigmoid: decode on the host (for INT8).")
@click.option("--dynamic-batch", is_flag=True, help="Dynamic batch dimension.")
@click.option("--dynamic-shape", is_flag=True, help="Dynamic batch, height and width.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [default: WEIGHTS stem + .onnx].")
def export(weights, imgsz, opset, head, dynamic_batch, dynamic_shape, output):
    """Export WEIGHTS (a .pt or a name such as yolov5s) to a simplified, tagged ONNX file."""
    from .export import ExportOptions, export_onnx
    from .model import load_model

    checkpoint = load_model(weights)
    target = Path(output or Path(weights).with_suffix(".onnx").name)
    options = ExportOptions(imgsz=tuple(imgsz) if len(imgsz) == 2 else (imgsz[0], imgsz[0]), opset=opset,
                            head=head, dynamic_batch=dynamic_batch, dynamic_shape=dynamic_shape)
    path = export_onnx(checkpoint.model, target, options)
    err.print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")


# --------------------------------------------------------------------------- build
@cli.command()
@click.argument("weights")
@click.option("-t", "--target", "target_name", help="Target name (see 'edgeyolo targets') or .toml path.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Bundle folder [default: WEIGHTS stem-TARGET].")
@click.option("--imgsz", type=int, multiple=True, help="Override the target's input size (h [w]).")
@click.option("--calib", help="Calibration images for INT8: a folder, a text file of paths, or a named set.")
@click.option("--calib-size", type=int, help="Calibration images to draw [default: 300].")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed for drawing calibration images.")
@click.option("--val", help="Evaluate the built engine on this labelled dataset before committing it.")
@click.option("--max-drop", type=float, default=0.5, show_default=True,
              help="With --val: the largest allowed mAP50-95 drop, in points, versus cpu-fp32.")
def build(weights, target_name, output, imgsz, calib, calib_size, calib_seed, val, max_drop):
    """Compile WEIGHTS for a target into a bundle folder (engine + manifest.json).

    WEIGHTS may also be a portable bundle (e.g. jetson-int8 built on a workstation):
    its engine is then compiled here, on the device, and cached beside it.
    """
    from .build import BuildOptions, build_bundle, compile_portable, prepare_calibration
    from .bundle import is_bundle
    from .gate import accuracy_gate
    from .targets import load_target

    if is_bundle(weights):
        engine = compile_portable(weights, calib, calib_size, calib_seed)
        err.print(f"compiled {engine} for this device", highlight=False)
        return
    if not target_name:
        raise EdgeYoloError("pass --target (see 'edgeyolo targets')")
    target = load_target(target_name)
    dest = Path(output or f"{Path(weights).stem}-{target.name}")
    size = None if not imgsz else (tuple(imgsz) if len(imgsz) == 2 else (imgsz[0], imgsz[0]))
    calibration = None
    if calib and not target.needs_calibration:
        log.warning("target %s is %s; --calib is ignored", target.name, target.precision)
    elif target.needs_calibration:
        if not calib:
            raise EdgeYoloError(f"target {target.name} is INT8: pass calibration images with --calib")
        calibration = prepare_calibration(weights, target, calib, calib_size, calib_seed, size)
    gate = accuracy_gate(weights, val, max_drop, progress_bar, _report_accuracy) if val else None
    bundle = build_bundle(weights, target, dest, BuildOptions(imgsz=size), calibration=calibration, gate=gate)
    files = ", ".join(f"{name} ({(bundle.path / name).stat().st_size / 1e6:.1f} MB)" for name in bundle.manifest["checksums"])
    err.print(f"built [bold]{bundle.path}[/] for {target.name}: {files}", highlight=False)


def _report_accuracy(acc: dict) -> None:
    table = Table("", "target", "mAP50-95", "mAP50", title=f"accuracy on {acc['data']} ({acc['images']} images)")
    for role in ("reference", "this"):
        r = acc[role]
        table.add_row(role, r["target"], f"{r['map50_95'] * 100:.2f}", f"{r['map50'] * 100:.2f}")
    err.print(table)
    verdict = "[green]pass[/]" if acc["passed"] else "[red]FAIL[/]"
    err.print(f"drop {acc['drop_points']:.2f} points (max {acc['max_drop_points']}): {verdict}")


# --------------------------------------------------------------------------- detect
@cli.command()
@click.argument("model")
@click.argument("sources", nargs=-1, required=True)
@click.option("--conf", type=float, default=0.25, show_default=True)
@click.option("--iou", type=float, default=0.45, show_default=True)
@click.option("--max-det", type=int, default=300, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print detections as JSON.")
@click.option("--save-dir", type=click.Path(file_okay=False), help="Save annotated images/videos here.")
def detect(model, sources, conf, iou, max_det, as_json, save_dir):
    """Detect objects in images, folders, globs or videos with a bundle (or weights, built for cpu-fp32)."""
    from .runtime import load
    from .runtime.images import read_image
    from .sources import resolve_sources, video_fps, video_frames

    inputs = resolve_sources(list(sources))
    detector = load(_open_model(model), conf=conf, iou=iou, max_det=max_det)
    save = Path(save_dir) if save_dir else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    results = []
    for source in inputs:
        if source.kind == "video":
            results.append(_detect_video(detector, source.path, save, video_frames, video_fps))
            continue
        try:
            image = read_image(source.path)
        except EdgeYoloError as exc:
            log.warning("skipping %s", exc)
            continue
        dets = detector.detect(image)
        results.append({"source": str(source.path), "detections": dets.to_list()})
        if save:
            _write_image(save / source.path.name, dets.draw(image))
        if not as_json:
            out.print(f"[bold]{source.path}[/]: {dets}", highlight=False)
    if as_json:
        _print_json(results)
    elif save:
        err.print(f"annotated results saved to {save}")


def _write_image(path: Path, image) -> None:
    import cv2

    ok, data = cv2.imencode(path.suffix if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg", image)
    if ok:
        data.tofile(str(path if path.suffix else path.with_suffix(".jpg")))


def _detect_video(detector, path: Path, save: Path | None, video_frames, video_fps) -> dict:
    import cv2

    writer, frames = None, []
    for index, frame in video_frames(path):
        dets = detector.detect(frame)
        frames.append({"frame": index, "detections": dets.to_list()})
        if save:
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(save / f"{path.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                         video_fps(path), (w, h))
            writer.write(dets.draw(frame))
    if writer is not None:
        writer.release()
    return {"source": str(path), "frames": frames}


# --------------------------------------------------------------------------- eval
@cli.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Dataset: a YOLO-layout folder, a data yaml, or a COCO json.")
@click.option("--backend", help="Run the bundle's ONNX on another backend (e.g. onnxruntime for a TensorRT bundle).")
@click.option("--per-class", is_flag=True, help="Also report AP50-95 per class.")
@click.option("--limit", type=int, help="Evaluate only the first N images.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, data, backend, per_class, limit, as_json):
    """COCO mAP50-95 / mAP50 of a bundle (or weights) on a labelled dataset, as YOLOv5's val.py runs it."""
    from .datasets import load_dataset
    from .evaluate import evaluate
    from .gate import load_for_eval

    dataset = load_dataset(data)
    detector = load_for_eval(_open_model(model), backend=backend)
    total = min(len(dataset), limit) if limit else len(dataset)
    with progress_bar(f"eval {detector.bundle.target['name']}", total) as advance:
        result = evaluate(detector, dataset, per_class=per_class, progress=advance, limit=limit)
    if as_json:
        return _print_json(result.to_dict())
    out.print(f"{detector.bundle.target['name']} on {data}: {result.images} images, {result.boxes} boxes")
    out.print(f"mAP50-95 {result.map50_95 * 100:.2f}   mAP50 {result.map50 * 100:.2f}   ({result.seconds:.1f} s)")
    if per_class:
        table = Table("class", "AP50-95")
        for name, ap in result.per_class.items():
            table.add_row(name, f"{ap * 100:.2f}")
        out.print(table)


# --------------------------------------------------------------------------- bench
@cli.command()
@click.argument("model")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--images", "image_source", help="Benchmark on these images (file or folder) instead of a synthetic 1280x720 frame.")
@click.option("--threads", type=int, help="Engine threads (where the backend takes a count).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(model, iters, warmup, image_source, threads, as_json):
    """On-device latency (p50/p90/p99), FPS, per-stage times and peak memory of a bundle."""
    from .bench import benchmark, synthetic_image
    from .runtime import load
    from .runtime.images import read_image
    from .sources import resolve_sources

    options = {"threads": threads} if threads is not None else {}
    detector = load(_open_model(model), **options)
    if image_source:
        images = [read_image(s.path) for s in resolve_sources([image_source]) if s.kind == "image"][:16]
    else:
        images = [synthetic_image()]
    result = benchmark(detector, images, iters=iters, warmup=warmup)
    if as_json:
        return _print_json(result.to_dict())
    out.print(f"[bold]{result.target}[/] ({result.backend}, threads {result.threads}, input {result.input_shape})")
    table = Table("stage", "p50 ms", "p90 ms", "p99 ms")
    table.add_row("end-to-end", *(f"{result.latency_ms[k]:.2f}" for k in ("p50", "p90", "p99")))
    for stage, values in result.stages_ms.items():
        table.add_row(stage, *(f"{values[k]:.2f}" for k in ("p50", "p90", "p99")))
    out.print(table)
    out.print(f"FPS {result.fps:.1f}   peak RSS {result.peak_rss_mb:.0f} MB")


# --------------------------------------------------------------------------- compare
@cli.command(name="compare")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Also evaluate each bundle on this labelled dataset (COCO mAP).")
@click.option("--limit", type=int, help="With --data: only the first N images.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Benchmark rounds, bundles taking turns.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def compare_cmd(bundles, data, limit, rounds, iters, as_json):
    """Compare bundles side by side: mAP, FPS, latency, peak memory and size."""
    from .compare import compare

    with progress_bar("benchmarking", rounds * len(bundles)) as advance:
        rows = compare([Path(b) for b in bundles], data=data, limit=limit, rounds=rounds, iters=iters,
                       progress=advance)
    if as_json:
        return _print_json(rows)
    table = Table("target", "backend", "precision", "mAP50-95", "mAP50", "FPS", "p50 ms", "p99 ms", "peak RSS MB",
                  "size MB", title=f"median of {rounds} alternating rounds of {iters} frames")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(r["target"], r["backend"], r["precision"], fmt(r["map50_95"]), fmt(r["map50"]), fmt(r["fps"]),
                      fmt(r["p50_ms"]), fmt(r["p99_ms"]), f"{r['peak_rss_mb']:.0f}", fmt(r["size_mb"]))
    out.print(table)


# --------------------------------------------------------------------------- info
@cli.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def info(bundle, as_json):
    """Show a bundle's manifest (and verify its checksums)."""
    from .bundle import load_bundle

    b = load_bundle(bundle)
    if as_json:
        return _print_json(b.manifest)
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


def main() -> None:
    cli(prog_name="edgeyolo")


if __name__ == "__main__":
    main()
