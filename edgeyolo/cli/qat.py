"""``edgeyolo qat``: quantisation-aware fine-tuning → a checkpoint whose INT8 ranges builds use as they are."""

from __future__ import annotations

import click

from .common import cli, err, progress_bar


@cli.command()
@click.argument("weights")
@click.option("--data", required=True, help="Training images: a folder (labels, if any, are not used) or a list file.")
@click.option("--calib", required=True, help="Calibration images for the initial ranges (folder, list file or named set).")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("-t", "--target", "target_name", default="jetson-int8", show_default=True,
              help="INT8 target whose Q/DQ recipe is trained: jetson-int8 (= cuda-int8's, symmetric activations) "
                   "builds cpu-int8, cuda-int8, jetson-int8 and intel-cpu-int8; cpu-int8 (asymmetric) builds "
                   "cpu-int8 and intel-cpu-int8.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--imgsz", type=click.IntRange(min=32), default=640, show_default=True)
@click.option("--calib-imgsz", type=click.IntRange(min=32), help="Calibrate the initial ranges at this size "
              "[default: --imgsz] (train small, start from the deployed size's ranges).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0), default=3e-5, show_default=True,
              help="Adam, weights and biases (chosen among 1e-5, 3e-5, 6e-5 on a held-out split: docs/int8.md#qat).")
@click.option("--scale-lr", type=click.FloatRange(min=0), default=5e-3, show_default=True,
              help="Adam, the activation scales (log-gain per scale).")
@click.option("--fixed-scales", is_flag=True, help="Keep the calibrated scales; fine-tune the weights only.")
@click.option("--limit", type=click.IntRange(min=1), help="Train on this many images drawn from --data (seeded).")
@click.option("--calib-size", type=click.IntRange(min=1), help="Calibration images to draw [default: the target's].")
@click.option("--float-from-stride", type=click.IntRange(min=0),
              help="Override the target's float stage (0: every stage INT8).")
@click.option("--keep-float", help="Override the target's float layers: none or names (model.0,model.2).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the fake-quantised graph trains (a GPU makes an epoch take minutes).")
@click.option("--save-every", type=click.IntRange(min=0), default=25, show_default=True,
              help="Steps between checkpoints (0: at the end only).")
def qat(weights, data, calib, out, target_name, epochs, imgsz, calib_imgsz, batch, lr, scale_lr, fixed_scales, limit, calib_size,
        float_from_stride, keep_float, seed, device, save_every):
    """Fine-tune WEIGHTS with fake quantisation matching the deployed INT8 graph, distilled from the FP32 model.

    Writes RUN/qat.safetensors (build it with `edgeyolo build RUN/qat.safetensors --target cpu-int8`:
    no calibration, the learned ranges are used) and RUN/model.qdq.onnx. Label-free: any images do.
    """
    from ..optimize.qat.trainer import QatConfig, QatRun

    kept = None
    if keep_float is not None:
        kept = () if keep_float.strip() in ("none", "") else tuple(n.strip() for n in keep_float.split(",") if n.strip())
    config = QatConfig(weights=weights, data=data, calib=calib, out=out, target=target_name, imgsz=imgsz,
                       calib_imgsz=calib_imgsz,
                       epochs=epochs, batch=batch, lr=lr, scale_lr=scale_lr, learn_scales=not fixed_scales,
                       limit=limit, calib_size=calib_size, seed=seed, float_from_stride=float_from_stride,
                       keep_float=kept, save_every=save_every, device=device)
    with _Progress() as progress:
        path = QatRun(config, progress=progress).run()
    err.print(f"QAT checkpoint saved to {path}; build it with: edgeyolo build {path} --target {target_name}",
              highlight=False)


class _Progress:
    """A progress bar that starts once the number of steps is known (after calibration)."""

    def __enter__(self):
        self.ctx = self.advance = None
        return self

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.ctx is None:
            self.ctx = progress_bar("QAT steps", total)
            self.advance = self.ctx.__enter__()
        self.advance(1)

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
