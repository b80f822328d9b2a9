"""``edgeyolo train``: fine-tune or train a model (one process, ``--nproc N`` or under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import EdgeYoloError
from .common import cli, err
from .optimize import ACTS


@cli.command()
@click.argument("weights", required=False)
@click.option("--data", help="Training data: a YOLO-layout folder or a data yaml with a 'train' entry.")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--imgsz", type=click.IntRange(min=32), default=640, show_default=True, help="Square training size.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Total batch (all processes).")
@click.option("--lr0", type=float, help="Initial learning rate (overrides the hyp file).")
@click.option("--hyp", "hyp_file", type=click.Path(dir_okay=False), help="Hyper-parameter YAML (any subset of keys).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--freeze", type=click.IntRange(min=0), default=0, show_default=True, help="Freeze the first N layers.")
@click.option("--val-data", help="Validation set for best selection (default: the yaml's val, else --val-split).")
@click.option("--val-split", type=float, default=0.1, show_default=True,
              help="Fraction of the train set held out for validation when there is no val set.")
@click.option("--cfg", help="Start from a YOLOv5 model yaml (or n/s/m/l/x name); shapes that match come from WEIGHTS.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--cos-lr", is_flag=True, help="Cosine LR schedule (default linear).")
@click.option("--augment", type=click.Choice(["default", "none"]), default="default", show_default=True)
@click.option("--show-augment", type=click.IntRange(min=1), help="Write N augmented samples to RUN/augment, exit.")
@click.option("--fl-gamma", type=float, help="Focal loss gamma (hyp fl_gamma).")
@click.option("--label-smoothing", type=float, help="Class label smoothing (hyp label_smoothing).")
@click.option("--iou-loss", type=click.Choice(["giou", "diou", "ciou"]), help="Box loss IoU (hyp iou_type).")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across processes (distributed runs).")
@click.option("--nominal-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Gradients accumulate over batches up to this many images per optimiser step.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (launches torchrun).")
@click.option("--act", type=click.Choice(ACTS), help="Rebuild the model with this activation first (weights kept).")
@click.option("--sparsity", type=click.FloatRange(min=0, min_open=True),
              help="L1 strength on BatchNorm scales (network slimming; then prune --importance bn), e.g. 1e-4.")
def train(weights, data, out, epochs, imgsz, batch, lr0, hyp_file, device, workers, resume, seed, freeze, val_data,
          val_split, cfg, optimizer, cos_lr, augment, show_augment, fl_gamma, label_smoothing, iou_loss, sync_bn,
          nominal_batch, nproc, act, sparsity):
    """Train WEIGHTS on --data into the run folder -o (last/best checkpoints, results.csv/png)."""
    from ..train import distributed as ddp

    if nproc > 1 and not ddp.from_env().enabled:
        argv = _argv_without_nproc(click.get_current_context())
        sys.exit(ddp.launch(nproc, argv))
    if resume is None and (weights is None or data is None or out is None):
        raise EdgeYoloError("train needs WEIGHTS, --data and -o RUN_DIR (or --resume RUN_DIR)")
    from ..train.hyp import load_hyp
    from ..train.trainer import TrainConfig, Trainer, command_line

    hyp = load_hyp(hyp_file, {"lr0": lr0, "fl_gamma": fl_gamma, "label_smoothing": label_smoothing,
                              "iou_type": iou_loss})
    config = TrainConfig(weights=weights, data=data or "", out=out or resume, epochs=epochs, imgsz=imgsz, batch=batch,
                         hyp=hyp, device=device, workers=workers, seed=seed, freeze=freeze, val_data=val_data,
                         val_split=val_split, cfg=cfg, optimizer=optimizer, cos_lr=cos_lr, augment=augment,
                         sync_bn=sync_bn, nominal_batch=nominal_batch, act=act, sparsity=sparsity or 0.0,
                         command=command_line(_argv_without_nproc(click.get_current_context())))
    if show_augment:
        return _show_augment(config, show_augment)
    run = Trainer(config, resume=resume).train()
    if ddp.from_env().is_main:
        err.print(f"run saved to {run} (best.safetensors, last.safetensors, results.csv)")


def _show_augment(config, count: int) -> None:
    from ..model import load_model
    from ..train.augment import Augmenter
    from ..train.data import TrainSet, load_train_data, write_augment_samples

    loaded = load_model(config.weights)
    data = load_train_data(config.data, config.val_data, config.val_split, config.seed)
    train_set = TrainSet(data.train, config.imgsz, Augmenter(config.hyp, config.imgsz, config.augment, config.seed),
                         nc=loaded.model.detect.nc)
    written = write_augment_samples(train_set, count, Path(config.out) / "augment", list(loaded.names))
    err.print(f"{len(written)} augmented samples written to {Path(config.out) / 'augment'}")


def _argv_without_nproc(ctx: click.Context) -> list[str]:
    """This command's arguments as given, minus --nproc (for the processes torchrun starts)."""
    argv = ["train"]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name == "nproc" or value is None or value == param.default:
            continue
        if isinstance(param, click.Argument):
            argv.append(str(value))
        elif param.is_flag:
            argv.append(param.opts[0] if value else "")
        else:
            argv += [max(param.opts, key=len), str(value)]
    return [a for a in argv if a]
