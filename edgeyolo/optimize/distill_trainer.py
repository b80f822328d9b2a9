"""Distillation on top of the training engine: a ``Trainer`` whose student also learns from a teacher.

The Trainer's loop is kept as it is; this subclass only (a) builds the student with another
activation when asked, (b) runs the frozen teacher beside the student on every batch and adds
the distillation loss (``DistillLoss``), and (c) label-free, reads any folder of images and
drops the detection loss. Without a validation set (label-free) every epoch's model is ``best``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..train import trainer as trainer_module
from ..train.data import TrainData
from ..train.trainer import Trainer
from .act_swap import swap_activation
from .distill import (
    DistillLoss,
    DistillWeights,
    NeckTap,
    check_compatible,
    load_teacher,
)


class DistillTrainer(Trainer):
    def __init__(self, config, teacher: str, *, label_free: bool = False, act: str | None = None,
                 weights: DistillWeights | None = None, show_progress: bool = True):
        super().__init__(config, show_progress=show_progress)
        self.teacher_spec, self.label_free, self.act = teacher, label_free, act
        self.distill_weights = weights or DistillWeights()

    def _build_model(self, state) -> nn.Module:
        model = super()._build_model(state)
        if self.act:
            model = swap_activation(model, self.act)
            for p in model.parameters():
                p.requires_grad_(True)
        return model

    def before_train(self) -> None:
        # Teacher and student are checked before the Trainer creates the run folder (nothing half-written).
        teacher = load_teacher(self.teacher_spec, torch.device("cpu"))
        check_compatible(teacher, self._build_model(None))
        with _images_only(self.label_free):
            super().before_train()
        self.teacher = teacher.to(self.device)
        self.distill = DistillLoss(self.teacher, self.model, self.distill_weights).to(self.device)
        self._add_to_optimizer(self.distill.adapters)
        self.student_tap, self.teacher_tap = NeckTap(self.model), NeckTap(self.teacher)
        self.train_model = _WithTeacher(self.train_model, self.teacher)
        self.criterion = _DistillCriterion(self.criterion, self.distill, self.student_tap, self.teacher_tap,
                                           self.train_model, self.label_free)
        self.distill_sum = torch.zeros(4)

    def _add_to_optimizer(self, adapters: nn.Module) -> None:
        """Adapter weights join the decayed group, their biases the bias group (the schedule covers both)."""
        groups = self.optimizer.param_groups
        for name, p in adapters.named_parameters():
            groups[0 if name.endswith("bias") else 1]["params"].append(p)

    def train_iteration(self, images, targets) -> None:
        super().train_iteration(images, targets)
        self.distill_sum += self.criterion.last_parts.cpu()

    def before_epoch(self) -> None:
        super().before_epoch()
        self.distill_sum = torch.zeros(4)

    def after_epoch(self) -> None:
        mean = (self.distill_sum / max(self.batches, 1)).tolist()
        print(f"epoch {self.epoch + 1}: distill obj {mean[0]:.4f} cls {mean[1]:.4f} box {mean[2]:.4f} "
              f"feature {mean[3]:.4f}", file=sys.stderr, flush=True)
        if self.data.val is not None:
            return super().after_epoch()
        if self.dist.is_main:  # label-free without --val-data: nothing to select on
            self.save_last(epochs_done=self.epoch + 1)
            self._save_best()


class _WithTeacher(nn.Module):
    """Runs the frozen teacher on the student's batch (kept for the criterion), returns the student's maps."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher_ref = student, [teacher]  # a list: the teacher is no submodule to train
        self.teacher_maps = None

    def forward(self, images: torch.Tensor):
        with torch.no_grad():
            self.teacher_maps = self.teacher_ref[0](images)
        return self.student(images)


class _DistillCriterion:
    """Detection loss (with labels) + distillation loss, both per-image sums × batch like YoloLoss."""

    def __init__(self, detection, distill: DistillLoss, student_tap: NeckTap, teacher_tap: NeckTap,
                 runner: _WithTeacher, label_free: bool):
        self.detection, self.distill, self.label_free = detection, distill, label_free
        self.student_tap, self.teacher_tap, self.runner = student_tap, teacher_tap, runner
        self.last_parts = torch.zeros(4)

    def __call__(self, preds, targets):
        batch = preds[0].shape[0]
        loss, parts = self.distill(preds, self.runner.teacher_maps, self.student_tap.features,
                                   self.teacher_tap.features, None if self.label_free else targets)
        self.last_parts = parts.detach().float()
        loss = loss * batch
        if self.label_free:
            return loss, torch.zeros(3, device=loss.device)
        det_loss, det_parts = self.detection(preds, targets)
        return det_loss + loss, det_parts


@contextmanager
def _images_only(active: bool):
    """Label-free: let the Trainer read any folder of images (no labels needed, none used)."""
    if not active:
        yield
        return
    original = trainer_module.load_train_data
    trainer_module.load_train_data = load_image_folder
    try:
        yield
    finally:
        trainer_module.load_train_data = original


def load_image_folder(spec, val_spec=None, val_split: float = 0.1, seed: int = 0) -> TrainData:
    """Any folder of images as a train set (labels, if present, are ignored); ``val_spec`` optional."""
    import numpy as np

    from ..datasets import Dataset, Sample, _image_files, load_dataset
    from ..errors import EdgeYoloError

    path = Path(spec)
    if not path.is_dir():
        raise EdgeYoloError(f"{spec}: label-free distillation needs a folder of images")
    folder = path / "images" if (path / "images").is_dir() else path
    images = _image_files(folder)
    if not images:
        raise EdgeYoloError(f"{folder}: no images found")
    # Labels play no part even where they exist: the teacher is the only supervision.
    samples = [Sample(image=p, boxes=None, classes=np.zeros(0, int), normalised=np.zeros((0, 4))) for p in images]
    train = Dataset(root=path, samples=samples, names=None)
    val = load_dataset(val_spec) if val_spec else None
    return TrainData(train=train, val=val, val_source=f"--val-data {val_spec}" if val_spec else "none (label-free)")
