"""``edgeyolo prune`` and ``edgeyolo distill``: model → smaller / recovered model (our checkpoint format)."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import click

from ..errors import EdgeYoloError
from .common import cli, err, progress_bar

ACTS = ["relu", "relu6", "leakyrelu", "hardswish", "silu"]


@cli.command()
@click.argument("weights")
@click.option("--ratio", type=float, help="Fraction of each layer group's channels to remove (0-1).")
@click.option("--target-flops", "target_flops", type=float, help="Prune until GFLOPs at 640 are at most this.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Pruned checkpoint.")
@click.option("--importance", type=click.Choice(["l1", "bn", "taylor"]), default="l1", show_default=True)
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across layers (default: uniform).")
@click.option("--allocate", "allocation", type=click.Choice(["uniform", "sensitivity"]), default="uniform",
              show_default=True, help="sensitivity: measure each layer group's damage alone on --calib images and "
                                      "spend the GFLOPs budget (--ratio: uniform's) where it hurts least.")
@click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
              help="Keep channel counts a multiple of this (1 = no rounding).")
@click.option("--iterative", type=click.IntRange(min=1), default=1, show_default=True,
              help="Reach the ratio in K steps, fine-tuning on --data between them.")
@click.option("--data", help="Images with labels: Taylor gradients and recovery between iterative steps.")
@click.option("--recover-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--imgsz", type=click.IntRange(min=32), default=320, show_default=True, help="Size for --data use.")
@click.option("--calib", help="Unlabelled images (folder, list file or named set): BatchNorm statistics are "
                              "re-estimated on them after pruning (advised: one-shot pruning shifts them); a "
                              "folder is seen as training mosaics, the distribution the statistics belong to.")
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--reconstruct", is_flag=True,
              help="After pruning, re-fit every layer by least squares on the --calib images to reproduce the "
                   "unpruned model's outputs (label-free, no training; minutes at 640).")
def prune(weights, ratio, target_flops, out, importance, global_pruning, allocation, round_to, iterative, data,
          recover_epochs, imgsz, calib, calib_size, reconstruct):
    """Remove channels from WEIGHTS (structured pruning); prints params and GFLOPs before -> after."""
    from ..model import load_model, save_model
    from ..optimize import prune as pruning

    if iterative > 1 and data is None:
        raise EdgeYoloError("--iterative needs --data to recover between steps")
    if allocation == "sensitivity" and not calib:
        raise EdgeYoloError("--allocate sensitivity needs --calib (unlabelled images to measure the damage on)")
    if reconstruct and not calib:
        raise EdgeYoloError("--reconstruct needs --calib (unlabelled images to fit the layers on)")
    loaded = load_model(weights)
    model = loaded.model.float()
    original = copy.deepcopy(model).eval() if reconstruct else None
    hyp = None
    loss_fn = recover = None
    if data is not None:
        from ..train.hyp import load_hyp

        hyp = load_hyp(None)
        if importance == "taylor":
            loss_fn = pruning.taylor_loss_fn(_few_batches(data, imgsz, model), hyp, imgsz)
        if iterative > 1:
            recover = _recover_with_trainer(data, imgsz, recover_epochs, Path(out))
    from ..optimize.allocate import SENSITIVITY_IMAGES

    # mosaics for BatchNorm and reconstruction (a folder); letterboxes for the sensitivity
    # measurement and for calibration sources that are not a folder
    fitting = _training_like_batches(calib, calib_size, imgsz) if calib else []
    images = _calibration_batches(calib, calib_size, imgsz) \
        if calib and (allocation == "sensitivity" or not fitting) else []
    fitting = fitting or images
    sensitivity_images = images[:max(1, SENSITIVITY_IMAGES // CALIB_BATCH)]
    with contextlib.ExitStack() as stack:
        result = pruning.prune(model, ratio=ratio, target_gflops=target_flops, importance=importance,
                               global_pruning=global_pruning, round_to=round_to if round_to > 1 else None,
                               loss_fn=loss_fn, recover=recover, iterative=iterative, allocation=allocation,
                               images=sensitivity_images, progress=_late_progress_bar(stack, "measuring damage"))
    recalibrated = _recalibrate(result.model, fitting, calib) if calib and not reconstruct else 0
    meta = {"pruned_from": str(weights), "ratio": result.ratio, "importance": importance, "global": global_pruning,
            "allocation": allocation, "batchnorm_recalibrated_on": recalibrated}
    if reconstruct:
        meta["reconstruction"] = _reconstruct(result.model, original, fitting, calib)
    if result.allocation is not None:
        meta["groups"] = result.allocation
    path = save_model(result.model, out, meta=meta)
    err.print(f"params {result.before.params / 1e6:.3f} M -> {result.after.params / 1e6:.3f} M, "
              f"GFLOPs@640 {result.before.gflops:.2f} -> {result.after.gflops:.2f} (ratio {result.ratio:.3f})")
    err.print(f"pruned model saved to {path}")


CALIB_BATCH = 8


def _late_progress_bar(stack: contextlib.ExitStack, label: str):
    """A ``progress(done, total)`` callback whose bar opens (on ``stack``) once the total is known."""
    advance = []

    def progress(done: int, total: int) -> None:
        if not advance:
            advance.append(stack.enter_context(progress_bar(label, total)))
        advance[0](1)

    return progress


def _calibration_batches(calib, size, imgsz) -> list:
    from ..calibration import load_calibration
    from ..optimize.batchnorm import letterboxed_batches
    from ..runtime.preprocess import LetterboxSettings

    images = load_calibration(calib, LetterboxSettings(imgsz=(imgsz, imgsz)), size=None, default_size=size)
    return list(letterboxed_batches(images.letterboxed, CALIB_BATCH))


def _training_like_batches(calib, size, imgsz) -> list:
    """A folder of images as mosaics (the training pipeline's view): what BatchNorm statistics and the
    reconstruction should see. Other calibration sources (list files, named sets) stay letterboxed."""
    if not Path(calib).is_dir():
        return []
    from ..optimize.batchnorm import training_batches

    return training_batches(calib, size, imgsz, batch=CALIB_BATCH)


def _recalibrate(model, batches, calib) -> int:
    from ..optimize.batchnorm import recalibrate_batchnorm

    seen = recalibrate_batchnorm(model, batches)
    err.print(f"BatchNorm statistics re-estimated on {seen} images from {calib}")
    return seen


def _reconstruct(model, original, batches, calib) -> dict:
    from ..optimize.reconstruct import reconstruct

    with progress_bar("reconstructing layers", None) as advance:
        report = reconstruct(model, original, batches, progress=lambda done, total: advance(1))
    err.print(f"{report.layers} layers re-fit to the unpruned model's outputs on {report.images} images from {calib}")
    return report.describe()


def _few_batches(data, imgsz, model, count: int = 2, batch: int = 8):
    from ..train.augment import Augmenter
    from ..train.data import TrainSet, collate, load_train_data
    from ..train.hyp import load_hyp

    train = load_train_data(data).train
    samples = TrainSet(train, imgsz, Augmenter(load_hyp(None), imgsz, "none", seed=0), nc=model.detect.nc)
    items = [samples[i] for i in range(min(len(samples), count * batch))]
    return [collate(items[i:i + batch]) for i in range(0, len(items), batch)]


def _recover_with_trainer(data, imgsz, epochs, out: Path):
    """A ``recover(model, step)`` that fine-tunes the model in place with the Trainer."""
    def recover(model, step):
        from ..model import load_model, save_model
        from ..train.hyp import load_hyp
        from ..train.trainer import TrainConfig, Trainer

        run = out.with_name(f"{out.stem}-recover{step + 1}")
        start = save_model(model, run.with_suffix(".start.safetensors"))
        config = TrainConfig(weights=str(start), data=data, out=str(run), epochs=epochs, imgsz=imgsz,
                             hyp=load_hyp(None), command=f"prune --iterative (recovery step {step + 1})")
        Trainer(config).train()
        model.load_state_dict(load_model(run / "best.safetensors").model.state_dict())

    return recover


@cli.command()
@click.option("--teacher", required=True, help="Teacher weights (any checkpoint edgeyolo reads).")
@click.option("--student", required=True, help="Student weights (e.g. a pruned checkpoint).")
@click.option("--data", required=True, help="Training images: YOLO folder / data yaml, or any image folder with "
              "--no-labels.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--no-labels", "label_free", is_flag=True, help="Label-free: the teacher is the only supervision.")
@click.option("--act", type=click.Choice(ACTS), help="Rebuild the student with this activation first.")
@click.option("--cfg", help="Student architecture (YOLOv5 yaml or n/s/m/l/x), initialised from --student.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--imgsz", type=click.IntRange(min=32), default=640, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr0", type=float, help="Initial learning rate (default: the hyp default).")
@click.option("--val-data", help="Labelled set for best selection (default: held out of --data; none label-free).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--temperature", type=float, default=2.0, show_default=True)
@click.option("--feature-gain", type=float, default=0.02, show_default=True, help="Weight of feature imitation.")
def distill(teacher, student, data, out, label_free, act, cfg, epochs, imgsz, batch, lr0, val_data, device, workers,
            temperature, feature_gain):
    """Train --student from --teacher (response + masked feature imitation), with or without labels."""
    from ..optimize.distill import DistillWeights
    from ..optimize.distill_trainer import DistillTrainer
    from ..train.hyp import load_hyp
    from ..train.trainer import TrainConfig, command_line

    config = TrainConfig(weights=student, data=data, out=out, epochs=epochs, imgsz=imgsz, batch=batch,
                         hyp=load_hyp(None, {"lr0": lr0}), device=device, workers=workers, val_data=val_data,
                         cfg=cfg, command=command_line(sys.argv[1:]))
    weights = DistillWeights(temperature=temperature, feature=feature_gain)
    run = DistillTrainer(config, teacher, label_free=label_free, act=act, weights=weights).train()
    err.print(f"run saved to {run} (best.safetensors, last.safetensors)")
