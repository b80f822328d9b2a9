"""``edgeyolo qat``: calibrate, write the deployed Q/DQ graph, fine-tune it against the FP32 model, save.

The phases, in order (``QatRun.run``): ``prepare`` (every input checked before the run folder is
made: weights, target, calibration and training images), ``calibrate`` (the target's PTQ recipe
gives the placement and the initial scales), ``train`` (label-free distillation: the FP32 graph is
the teacher on the same batch, random horizontal flips), ``save`` (the checkpoint every few steps,
at the end also the Q/DQ ONNX written back from it, which checks the round trip).
"""

from __future__ import annotations

import dataclasses as dc
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import EdgeYoloError
from .checkpoint import load_fused_weights, save_qat_checkpoint
from .graph import QdqGraph
from .learned import LearnedRanges, check_qat_meta
from .loss import DistillGains, QatLoss

CHECKPOINT = "qat.safetensors"
QDQ_ONNX = "model.qdq.onnx"
SUMMARY = "qat.json"
QDQ_BACKENDS = ("onnxruntime", "tensorrt", "openvino")
LOG_EVERY = 10


@dataclass
class QatConfig:
    weights: str
    data: str
    calib: str
    out: str
    target: str = "jetson-int8"
    imgsz: int = 640
    calib_imgsz: int | None = None  # calibrate the initial ranges at this size (default: imgsz)
    epochs: int = 1
    batch: int = 8
    lr: float = 3e-5  # Adam, the convolutions' weights and biases (chosen on a held-out split: docs/int8.md#qat)
    scale_lr: float = 5e-3  # Adam, the activation scales' log-gains
    learn_scales: bool = True
    limit: int | None = None  # training images drawn from --data (seeded)
    calib_size: int | None = None
    seed: int = 0
    method: str | None = None  # placement overrides (default: the target's [calibration] recipe)
    float_from_stride: int | None = None
    keep_float: tuple[str, ...] | None = None
    save_every: int = 25  # steps between checkpoints
    device: str = "auto"  # cpu | cuda | auto (the training engine's select_device)
    gains: DistillGains = field(default_factory=DistillGains)


class QatRun:
    def __init__(self, config: QatConfig, progress=None):
        self.config = config
        self.progress = progress  # a callable(step, total, loss) or None
        self.out = Path(config.out)

    def run(self) -> Path:
        self.prepare()
        with tempfile.TemporaryDirectory(prefix="edgeyolo-qat-") as work:
            self.calibrate(Path(work))
            self.out.mkdir(parents=True, exist_ok=True)
            self.train()
            return self.save(final=True, work=Path(work))

    # ------------------------------------------------------------------ prepare
    def prepare(self) -> None:
        from ...bundle import sha256_file
        from ...calibration import list_candidates
        from ...model import load_model, resolve_weights
        from ...quantize import QuantizeSettings
        from ...targets import load_target

        c = self.config
        if c.epochs < 1 or c.batch < 1 or c.imgsz < 32 or not (c.lr >= 0 and c.scale_lr >= 0):
            raise EdgeYoloError("epochs, batch and imgsz must be positive and learning rates >= 0")
        target = load_target(c.target)
        if target.precision != "int8":
            raise EdgeYoloError(f"target {target.name} is {target.precision}; QAT needs an INT8 target")
        if target.backend not in QDQ_BACKENDS:
            raise EdgeYoloError(f"target {target.name} ({target.backend}) cannot take learned ranges: its converter "
                                f"quantises on its own; train for jetson-int8 and build {target.name} with PTQ")
        from ...train.trainer import select_device

        self.device = select_device(c.device)
        base = QuantizeSettings.from_target(target)
        self.settings = dc.replace(
            base, **{k: v for k, v in (("method", c.method), ("float_from_stride", c.float_from_stride),
                                       ("keep_float", c.keep_float)) if v is not None})
        self.target = target
        self.weights_path = resolve_weights(c.weights)
        self.checkpoint = load_model(self.weights_path)
        self.teacher_record = {"weights": str(self.weights_path.resolve()), "sha256": sha256_file(self.weights_path)}
        if self.out.exists() and any(self.out.iterdir()):
            raise EdgeYoloError(f"{self.out}: the run folder exists and is not empty")
        images = list_candidates(c.data)
        random.Random(c.seed).shuffle(images)
        self.images = images[:c.limit] if c.limit else images
        if len(self.images) < c.batch:
            raise EdgeYoloError(f"{c.data}: {len(self.images)} images, fewer than one batch of {c.batch}")

    # ------------------------------------------------------------------ calibrate
    def calibrate(self, work: Path) -> None:
        """The target's PTQ graph at the training size: placement + initial scales; the student and teacher."""
        import onnx

        from ...build import prepare_calibration
        from ...export import ExportOptions, export_onnx
        from ...quantize import calibrate_ranges, kept_nodes, split_head, write_qdq

        c = self.config
        imgsz = (c.imgsz, c.imgsz)
        self.export = {"imgsz": list(imgsz), "head": "sigmoid", "opset": self.target.opset}
        float_path = export_onnx(self.checkpoint.model, work / "float.onnx",
                                 ExportOptions(imgsz=imgsz, opset=self.target.opset, head="sigmoid"))
        calib_path, calib_imgsz = float_path, imgsz
        if c.calib_imgsz and c.calib_imgsz != c.imgsz:  # e.g. train at 320 from the ranges a 640 deployment has
            calib_imgsz = (c.calib_imgsz, c.calib_imgsz)
            calib_path = export_onnx(self.checkpoint.model, work / "calib.onnx",
                                     ExportOptions(imgsz=calib_imgsz, opset=self.target.opset, head="sigmoid"))
        self.calibration = prepare_calibration(self.weights_path, self.target, c.calib, c.calib_size,
                                               imgsz=calib_imgsz)
        self.calibration.method = self.settings.describe()
        ranges = calibrate_ranges(calib_path, self.calibration, self.settings)
        float_model = onnx.load(str(float_path))
        qdq, _ = write_qdq(float_path, ranges, self.settings, extra_float=kept_nodes(float_model, self.settings.keep_float))
        self.ranges = {name: [float(np.max(v)) if i else float(np.min(v)) for i, v in enumerate(data.range_value)]
                       for name, data in ranges.data.items()}
        self.student = QdqGraph(qdq, float_model, learn_scales=c.learn_scales)
        self.bias_corrected, self.refit = 0, {}
        if self.settings.refit:  # the re-fit solves the biases too
            self.refit = self._refit(calib_path, float_path, ranges)
        elif self.settings.bias_correction:
            self.bias_corrected = self._correct_biases(qdq, calib_path, float_path, ranges)
        self.teacher = QdqGraph(float_model, float_model, trainable=False).eval()
        head = split_head(float_model)
        convs = {n.name: n for n in float_model.graph.node if n.name in head.convs}
        self.head_outputs = [convs[name].output[0] for name in head.convs]
        self.features = [convs[name].input[0] for name in head.convs]
        self.na = len(self.checkpoint.model.detect.anchors[0])
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.loss = QatLoss(self.head_outputs, self.features, self.na, c.gains)

    def _correct_biases(self, qdq, calib_path: Path, float_path: Path, ranges) -> int:
        """Start from the bias-corrected PTQ graph the target builds (shifts measured at the calibration size)."""
        import onnx

        from ...quantize import bias_shifts, kept_nodes, write_qdq

        if calib_path != float_path:  # the shifts are measured on the graph at the calibration images' size
            qdq, _ = write_qdq(calib_path, ranges, self.settings,
                               extra_float=kept_nodes(onnx.load(str(calib_path)), self.settings.keep_float))
        return self.student.shift_biases(qdq, bias_shifts(qdq, calib_path, self.calibration))

    def _refit(self, calib_path: Path, float_path: Path, ranges) -> dict:
        """Start from the re-fit PTQ graph the target builds (``refit.py``; solved at the calibration size)."""
        import onnx

        from ...quantize import kept_nodes, write_qdq
        from .refit import calibration_chunks, refit

        calib_model = onnx.load(str(calib_path))
        student = self.student
        if calib_path != float_path:  # a graph at the calibration images' size, sharing the weights' names
            qdq, _ = write_qdq(calib_path, ranges, self.settings,
                               extra_float=kept_nodes(calib_model, self.settings.keep_float))
            student = QdqGraph(qdq, calib_model, learn_scales=False, trainable=False)
        report = refit(student, QdqGraph(calib_model, calib_model, trainable=False),
                       calibration_chunks(self.calibration), ridge=self.settings.refit_ridge,
                       weighting=self.settings.refit_weighting)
        if student is not self.student:
            with torch.no_grad():
                for key, value in student.weights.items():
                    self.student.weights[key].copy_(value)
        return report.describe()

    # ------------------------------------------------------------------ train
    def batches(self, epoch: int):
        from ...runtime.images import read_image
        from ...runtime.preprocess import LetterboxSettings, letterbox, to_input

        c = self.config
        settings = LetterboxSettings(imgsz=(c.imgsz, c.imgsz), auto=False, stride=self.checkpoint.model.imgsz_multiple)
        order = list(self.images)
        rng = random.Random(c.seed + epoch)
        rng.shuffle(order)
        for start in range(0, len(order) - c.batch + 1, c.batch):  # full batches only
            chunk = []
            for path in order[start:start + c.batch]:
                try:
                    image = to_input(letterbox(read_image(path), settings)[0])
                except (EdgeYoloError, OSError):
                    continue  # an unreadable image is skipped, as calibration does
                chunk.append(image[..., ::-1] if rng.random() < 0.5 else image)  # horizontal flip
            if chunk:
                yield torch.from_numpy(np.ascontiguousarray(np.concatenate(chunk)))

    def train(self) -> None:
        c = self.config
        weights = list(self.student.weights.values())
        groups = [{"params": weights, "lr": c.lr}]
        if self.student.scale_parameters():
            groups.append({"params": self.student.scale_parameters(), "lr": c.scale_lr})
        optimizer = torch.optim.Adam(groups)
        steps_per_epoch = len(self.images) // c.batch
        self.total_steps = steps_per_epoch * c.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps)))
        self.history, self.step, started = [], 0, time.time()
        torch.manual_seed(c.seed)
        self.student.train()
        for epoch in range(c.epochs):
            for images in self.batches(epoch):
                images = images.to(self.device, non_blocking=True)
                capture = (*self.head_outputs, *self.features)
                with torch.no_grad():
                    teacher = self.teacher(images, capture)
                student = self.student(images, capture)
                loss, parts = self.loss(student, teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                self.step += 1
                self.history.append({"step": self.step, "loss": float(loss.detach()), **parts})
                if self.progress:
                    self.progress(self.step, self.total_steps, float(loss.detach()))
                if self.step % LOG_EVERY == 0 or self.step == self.total_steps:
                    print(f"qat step {self.step}/{self.total_steps}: loss {float(loss.detach()):.4f} "
                          + " ".join(f"{k} {v:.4g}" for k, v in parts.items())
                          + f" ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
                if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save(final=False)
        self.seconds = time.time() - started

    # ------------------------------------------------------------------ save
    def qat_record(self) -> dict:
        c = self.config
        calib = self.calibration.describe()
        recent = self.history[-min(len(self.history), 10):]
        return {
            "teacher": self.teacher_record,
            "target": self.target.name,
            "bias_corrected_convs": self.bias_corrected,
            **({"refit": self.refit} if self.refit else {}),
            "settings": {"method": self.settings.method, "percentile": self.settings.percentile,
                         "float_from_stride": self.settings.float_from_stride,
                         "keep_float": list(self.settings.keep_float), "placement": self.settings.placement,
                         "activations": self.settings.activations},
            "export": self.export,
            "calibration": {k: calib[k] for k in ("source", "images", "images_sha256", "seed")},
            "training": {"data": str(c.data), "images": len(self.images), "epochs": c.epochs, "batch": c.batch,
                         "steps": self.step, "lr": c.lr, "scale_lr": c.scale_lr, "learn_scales": c.learn_scales,
                         "imgsz": c.imgsz, "calib_imgsz": c.calib_imgsz or c.imgsz, "seed": c.seed, "gains": dc.asdict(c.gains),
                         "device": str(self.device),
                         "final_loss": float(np.mean([h["loss"] for h in recent])) if recent else 0.0},
            "ranges": self.ranges,
            "scales": self.student.scales(),
            **({"zero_points": self.student.zero_points()} if self.settings.activations == "asymmetric" else {}),
        }

    def save(self, final: bool, work: Path | None = None) -> Path:
        qat = self.qat_record()
        model = load_fused_weights(self.checkpoint.model, self.student.float_weights())
        model.names = list(self.checkpoint.model.names)
        path = save_qat_checkpoint(model, self.out / CHECKPOINT, qat)
        if final:
            self._write_qdq(path, work)
            summary = {"checkpoint": str(path), "steps": self.step, "seconds": round(self.seconds, 1),
                       "history": self.history}
            (self.out / SUMMARY).write_text(json.dumps(summary, indent=1))
        return path

    def _write_qdq(self, checkpoint: Path, work: Path) -> None:
        """Export the saved checkpoint and write its Q/DQ ONNX from the learned scales (what a build does)."""
        from ...export import ExportOptions, export_onnx
        from ...model import load_model

        loaded = load_model(checkpoint)
        src = export_onnx(loaded.model, work / "trained.onnx",
                          ExportOptions(imgsz=tuple(self.export["imgsz"]), opset=self.export["opset"], head="sigmoid"))
        qat = check_qat_meta(loaded.description["meta"]["qat"], str(checkpoint))
        LearnedRanges(qat, str(checkpoint)).write(src, self.out / QDQ_ONNX)
        print(f"wrote {self.out / QDQ_ONNX}", file=sys.stderr)
