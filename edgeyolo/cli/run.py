"""Commands that run bundles: detect, eval, bench, compare."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import click
from rich.table import Table

from ..errors import EdgeYoloError
from ..log import log
from .common import cli, err, open_model, out, print_json, progress_bar


@cli.command()
@click.argument("model")
@click.argument("sources", nargs=-1, required=True)
@click.option("--conf", type=float, default=0.25, show_default=True)
@click.option("--iou", type=float, default=0.45, show_default=True)
@click.option("--max-det", type=int, default=300, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print detections as JSON.")
@click.option("--save-dir", type=click.Path(file_okay=False), help="Save annotated images/videos here.")
@click.option("--save-txt", is_flag=True, help="Also save YOLO txt labels (class xc yc w h conf) in SAVE_DIR/labels.")
@click.option("--save-json", is_flag=True, help="Also save COCO results (SAVE_DIR/predictions.json).")
@click.option("--depth", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Images in flight at once (read, inferred, post-processed in parallel); 1: one at a time.")
def detect(model, sources, conf, iou, max_det, as_json, save_dir, save_txt, save_json, depth):
    """Detect objects in images, folders, globs, videos or a camera (an index: 0) with a bundle.

    MODEL may also be weights: a cpu-fp32 bundle is then built once into the cache.
    Videos and cameras give an annotated mp4 in SAVE_DIR, with the measured FPS drawn on it.
    """
    from ..runtime import load
    from ..sources import resolve_sources
    from ..writers import coco_image_id, coco_results, write_coco_json, write_yolo_txt

    if (save_txt or save_json) and not save_dir:
        raise EdgeYoloError("--save-txt and --save-json write into --save-dir: pass one")
    inputs = resolve_sources(list(sources))
    detector = load(open_model(model), conf=conf, iou=iou, max_det=max_det)
    save = Path(save_dir) if save_dir else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    results, coco = [], []
    for is_stream, group in groupby(inputs, key=lambda source: source.kind in ("video", "camera")):
        if not is_stream:
            for source, image, dets in _detect_images(detector, group, depth):
                results.append({"source": str(source.path), "detections": dets.to_list()})
                if save:
                    _write_image(save / source.path.name, dets.draw(image))
                if save_txt:
                    write_yolo_txt(save / "labels" / f"{source.path.stem}.txt", dets)
                if save_json:
                    coco += coco_results(dets, coco_image_id(source.path))
                if not as_json:
                    out.print(f"[bold]{source.path}[/]: {dets}", highlight=False)
            continue
        for source in group:
            try:
                result = _detect_stream(detector, source, save, save_txt, depth)
            except EdgeYoloError:
                if source.kind == "camera":
                    raise
                log.warning("skipping %s: not a readable video", source.path)  # one corrupt video among many sources
                continue
            if source.kind == "video" and not result["frame_count"]:
                log.warning("skipping %s: not a readable video (no frames)", source.path)
                continue
            results.append(result)
    if save_json:
        write_coco_json(save / "predictions.json", coco)
    if as_json:
        print_json(results)
    elif save:
        err.print(f"results saved to {save}")


def _detect_images(detector, sources, depth: int):
    """(source, image, detections) per readable image, in order, ``depth`` pipelined at once.

    Each image is read and detected in a worker (``runtime.pipeline``), exactly as ``detect()``
    one by one; an unreadable one is skipped with a warning, logged here in input order.
    """
    from ..runtime.images import read_image
    from ..runtime.pipeline import ordered_map

    if hasattr(detector.engine, "async_queue"):  # OpenVINO: read here, inferred on its async queue
        yield from _stream_images(detector, sources, depth)
        return

    def work(source):
        try:
            image = read_image(source.path)
        except EdgeYoloError as exc:
            return source, None, exc
        return source, image, detector.detect(image)

    for source, image, dets in ordered_map(work, sources, depth):
        if image is None:
            log.warning("skipping %s", dets)
            continue
        yield source, image, dets


def _stream_images(detector, sources, depth: int):
    """``_detect_images`` through ``Detector.stream``: images read in this thread, unreadable ones skipped."""
    from collections import deque

    from ..runtime.images import read_image

    read = deque()  # (source, image) of the frames in flight, oldest first: stream yields in input order

    def readable():
        for source in sources:
            try:
                image = read_image(source.path)
            except EdgeYoloError as exc:
                log.warning("skipping %s", exc)
                continue
            read.append((source, image))
            yield image

    for dets in detector.stream(readable(), depth=depth):
        source, image = read.popleft()
        yield source, image, dets


def _write_image(path: Path, image) -> None:
    import cv2

    ok, data = cv2.imencode(path.suffix if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg", image)
    if ok:
        data.tofile(str(path if path.suffix else path.with_suffix(".jpg")))


def _detect_stream(detector, source, save: Path | None, save_txt: bool, depth: int = 1) -> dict:
    """Every frame of a video or camera; the annotated frames (FPS drawn on) go to SAVE_DIR/NAME.mp4.

    A video's frames run through ``Detector.stream`` (``depth`` in flight); a camera's one at a
    time (no frames queued behind a live view). A camera runs until Ctrl-C, which ends it
    normally; its per-frame detections are not kept in memory (a live source has no end), only
    the annotated video and labels are.
    """
    from collections import deque

    from ..video import FpsMeter, VideoOut, draw_fps, frames, open_capture, source_fps
    from ..writers import write_yolo_txt

    camera = source.kind == "camera"
    name = f"camera{source.path}" if camera else source.path.stem
    capture = open_capture(int(str(source.path)) if camera else source.path)
    video = VideoOut(save / f"{name}.mp4", source_fps(capture)) if save else None
    meter, per_frame, in_flight = FpsMeter(), [], deque()

    def read():
        for index, frame in frames(capture):
            in_flight.append((index, frame))  # stream yields in input order: the oldest is the next result
            yield frame

    results = detector.stream(read(), depth=1 if camera else depth)
    try:
        for dets in results:
            index, frame = in_flight.popleft()
            fps = meter.tick()
            if not camera:
                per_frame.append({"frame": index, "detections": dets.to_list()})
            if video:
                video.write(draw_fps(dets.draw(frame), fps) if fps else dets.draw(frame))
            if save_txt:
                write_yolo_txt(save / "labels" / f"{name}_{index}.txt", dets)
    except KeyboardInterrupt:
        if not camera:
            raise
    finally:  # keep what was written playable
        results.close()
        capture.release()
        if video:
            video.close()
    err.print(f"{source.path}: {meter.frames} frames at {meter.average:.1f} FPS"
              + (f", annotated video {video.path}" if video else ""), highlight=False)
    return {"source": str(source.path), "frames": per_frame, "frame_count": meter.frames,
            "fps": round(meter.average, 2)}


@cli.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Dataset: a YOLO-layout folder, a data yaml, or a COCO json.")
@click.option("--backend", help="Run the bundle's ONNX on another backend (e.g. onnxruntime for a TensorRT bundle).")
@click.option("--per-class", is_flag=True, help="Also report AP50-95 per class.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, data, backend, per_class, limit, as_json):
    """COCO mAP50-95 / mAP50 of a bundle (or weights) on a labelled dataset, as YOLOv5's val.py runs it."""
    from ..datasets import load_dataset
    from ..evaluate import evaluate
    from ..gate import load_for_eval

    dataset = load_dataset(data)
    detector = load_for_eval(open_model(model), backend=backend)
    dataset.check_classes(len(detector.names))
    total = min(len(dataset), limit) if limit else len(dataset)
    with progress_bar(f"eval {detector.bundle.target['name']}", total) as advance:
        result = evaluate(detector, dataset, per_class=per_class, progress=advance, limit=limit)
    if as_json:
        return print_json(result.to_dict())
    out.print(f"{detector.bundle.target['name']} on {data}: {result.images} images, {result.boxes} boxes")
    out.print(f"mAP50-95 {result.map50_95 * 100:.2f}   mAP50 {result.map50 * 100:.2f}   ({result.seconds:.1f} s)")
    if per_class:
        table = Table("class", "AP50-95")
        for name, ap in result.per_class.items():
            table.add_row(name, f"{ap * 100:.2f}")
        out.print(table)


@cli.command()
@click.argument("model")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True, help="Timed frames.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed frames first (engine caches, thread pools).")
@click.option("--images", "image_source", help="Benchmark on these images (file or folder) instead of a synthetic 1280x720 frame.")
@click.option("--threads", type=int, help="Engine threads (where the backend takes a count).")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True,
              help="latency: detect() one frame at a time; throughput: Detector.stream, --depth frames in flight.")
@click.option("--depth", type=click.IntRange(1, 64), default=3, show_default=True,
              help="With --mode throughput: frames in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--from-disk", is_flag=True, help="With --images: read each image file in the timed loop (a 'read' stage).")
def bench(model, iters, warmup, image_source, threads, mode, depth, as_json, from_disk):
    """On-device latency (p50/p90/p99), FPS, per-stage times and peak memory of a bundle.

    --mode throughput measures FPS over ITERS frames of a pipelined stream instead.
    """
    from ..bench import benchmark, benchmark_throughput, synthetic_image
    from ..runtime import load
    from ..runtime.images import read_image
    from ..sources import resolve_sources

    options = {"threads": threads} if threads is not None else {}
    detector = load(open_model(model), **options)
    if image_source:
        paths = [s.path for s in resolve_sources([image_source]) if s.kind == "image"][:16]
        images = [str(path) if from_disk else read_image(path) for path in paths]
        if not images:
            raise EdgeYoloError(f"{image_source}: no images to benchmark on (bench --images takes image files)")
    else:
        images = [synthetic_image()]
    if mode == "throughput":
        result = benchmark_throughput(detector, images, iters=iters, warmup=warmup, depth=depth)
    else:
        result = benchmark(detector, images, iters=iters, warmup=warmup)
    if as_json:
        return print_json(result.to_dict())
    out.print(f"[bold]{result.target}[/] ({result.backend}, threads {result.threads}, input {result.input_shape})")
    if mode == "throughput":
        out.print(f"throughput: FPS {result.fps:.1f} over {iters} frames, {depth} in flight   "
                  f"peak RSS {result.peak_rss_mb:.0f} MB")
        return
    table = Table("stage", "p50 ms", "p90 ms", "p99 ms")
    table.add_row("end-to-end", *(f"{result.latency_ms[k]:.2f}" for k in ("p50", "p90", "p99")))
    for stage, values in result.stages_ms.items():
        table.add_row(stage, *(f"{values[k]:.2f}" for k in ("p50", "p90", "p99")))
    out.print(table)
    out.print(f"FPS {result.fps:.1f}   peak RSS {result.peak_rss_mb:.0f} MB")


@cli.command(name="compare")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Also evaluate each bundle on this labelled dataset (COCO mAP).")
@click.option("--limit", type=int, help="With --data: only the first N images.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Benchmark rounds, bundles taking turns.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed frames per bundle in each round (after 5 warm-up frames).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def compare_cmd(bundles, data, limit, rounds, iters, as_json):
    """Compare bundles side by side: mAP, FPS, latency, peak memory and size."""
    from ..compare import compare

    with progress_bar("benchmarking", rounds * len(bundles)) as advance:
        rows = compare([Path(b) for b in bundles], data=data, limit=limit, rounds=rounds, iters=iters,
                       progress=advance)
    if as_json:
        return print_json(rows)
    table = Table("target", "backend", "precision", "mAP50-95", "mAP50", "FPS", "p50 ms", "p99 ms", "peak RSS MB",
                  "size MB", title=f"median of {rounds} alternating rounds of {iters} frames")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(r["target"], r["backend"], r["precision"], fmt(r["map50_95"]), fmt(r["map50"]), fmt(r["fps"]),
                      fmt(r["p50_ms"]), fmt(r["p99_ms"]), f"{r['peak_rss_mb']:.0f}", fmt(r["size_mb"]))
    out.print(table)
