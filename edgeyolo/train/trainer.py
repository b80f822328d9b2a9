"""The training loop: one ``Trainer`` whose phases are small methods (YOLOX's shape, YOLOv5's recipe).

``train()`` = ``before_train`` → for each epoch (``before_epoch`` → ``train_iteration`` per batch
→ ``after_epoch``) → ``after_train``. Everything that can be wrong with the input (weights, data,
hyp, resume folder, batch size) is checked in ``before_train`` before the run folder is touched.
"""

from __future__ import annotations

import copy
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import EdgeYoloError
from . import distributed as ddp
from . import results
from .augment import Augmenter
from .checkpoint import load_training_state, paths_for, save_training_state
from .data import TrainSet, data_fingerprint, load_train_data, make_loader, write_split
from .ema import ModelEMA
from .loss import YoloLoss
from .optim import (
    NOMINAL_BATCH,
    accumulate_steps,
    apply_schedule,
    build_optimizer,
    scaled_weight_decay,
    warmup_iterations,
)
from .validate import validate

GRAD_CLIP = 10.0


@dataclass
class TrainConfig:
    """Every knob of a run (saved in ``last`` so ``--resume`` continues with the same ones)."""

    weights: str | None
    data: str
    out: str
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16
    hyp: dict = field(default_factory=dict)
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    freeze: int = 0
    val_data: str | None = None
    val_split: float = 0.1
    cfg: str | None = None
    optimizer: str = "sgd"
    cos_lr: bool = False
    augment: str = "default"
    sync_bn: bool = False
    nominal_batch: int = NOMINAL_BATCH
    command: str = ""
    act: str | None = None  # rebuild the model with this activation before training (weights kept)
    sparsity: float = 0.0  # L1 strength on BatchNorm scales (network slimming, before ``prune --importance bn``)


def select_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise EdgeYoloError("--device cuda: no CUDA device available")
        return torch.device("cuda", local_rank)
    if spec != "cpu":
        raise EdgeYoloError(f"--device must be cpu, cuda or auto, not {spec!r}")
    return torch.device("cpu")


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | Path | None = None, show_progress: bool = True):
        self.config, self.resume_dir, self.show_progress = config, resume, show_progress
        self.dist = ddp.from_env()
        self.run = Path(config.out)
        self.start_epoch, self.best_fitness, self.iteration = 0, None, 0
        self.epoch = 0

    # ------------------------------------------------------------------ the loop

    def train(self) -> Path:
        """Train; returns the run folder. Ctrl-C saves ``last`` and re-raises KeyboardInterrupt."""
        self.before_train()
        try:
            for self.epoch in range(self.start_epoch, self.config.epochs):
                self.before_epoch()
                for images, targets in self.progress:
                    self.train_iteration(images, targets)
                self.after_epoch()
        except KeyboardInterrupt:
            self.save_last(interrupted=True)
            raise
        finally:
            self.after_train()
        return self.run

    # ------------------------------------------------------------------ phases

    def before_train(self) -> None:
        state = self._read_resume() if self.resume_dir else None
        if state is None and paths_for(self.run / "last")[0].exists():  # every rank checks: none may hang
            raise EdgeYoloError(f"{self.run}: already holds a run (continue it with --resume {self.run}, "
                                "or pick another -o)")
        c = self.config
        self.device = select_device(c.device, self.dist.local_rank)
        ddp.init(self.dist, self.device)
        self._seed(c.seed + self.dist.rank)
        self.model = self._build_model(state).to(self.device)
        self.data = load_train_data(c.data, c.val_data, c.val_split, c.seed)
        self.names = list(self.model.names)
        augmenter = Augmenter(c.hyp, c.imgsz, c.augment, seed=c.seed + self.dist.rank)
        self.train_set = TrainSet(self.data.train, c.imgsz, augmenter, nc=self.model.detect.nc)
        self.loader = make_loader(self.train_set, c.batch, c.workers, c.seed, self.dist.rank, self.dist.world_size)
        self.accumulate = accumulate_steps(c.batch, c.nominal_batch)
        self.optimizer = build_optimizer(self.model, c.optimizer, c.hyp["lr0"], c.hyp["momentum"],
                                         scaled_weight_decay(c.hyp["weight_decay"], c.batch, c.nominal_batch))
        self.ema = ModelEMA(self.model) if self.dist.is_main else None
        if state is not None:
            state.apply(self.model, ema=self.ema.ema if self.ema else None, optimizer=self.optimizer)
            if self.ema:
                self.ema.updates = state.ema_updates
            self.start_epoch, self.best_fitness = state.epoch, state.best_fitness
            if self.start_epoch >= c.epochs:
                raise EdgeYoloError(f"{self.resume_dir}: the run already finished its {c.epochs} epochs")
        self.model.train()
        self.train_model = ddp.wrap(self.model, self.dist, self.device, c.sync_bn)
        self.criterion = YoloLoss(self.model, c.hyp, imgsz=c.imgsz)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.warmup_iters = warmup_iterations(c.hyp["warmup_epochs"], len(self.loader))
        self.iteration = self.start_epoch * len(self.loader)
        self.last_step = self.iteration - 1
        if self.dist.is_main:
            self._open_run_folder(resumed=state is not None)
        ddp.barrier(self.dist)

    def before_epoch(self) -> None:
        self.model.train()
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)
        self.loss_sum = torch.zeros(3)
        self.batches = 0
        self.images_seen = 0
        self.epoch_start = time.perf_counter()
        self.progress = _EpochProgress(self.loader, f"epoch {self.epoch + 1}/{self.config.epochs}",
                                       enabled=self.show_progress and self.dist.is_main)
        self.optimizer.zero_grad()

    def train_iteration(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        c, ni = self.config, self.iteration
        if ni < self.warmup_iters:  # accumulate ramps from 1 to nominal/batch during warm-up (as upstream)
            ramp = np.interp(ni, [0, self.warmup_iters], [1, c.nominal_batch / c.batch])
            self.accumulate = max(1, round(float(ramp)))
        apply_schedule(self.optimizer, c.hyp, self.epoch, c.epochs, ni, self.warmup_iters, c.cos_lr)
        images = images.to(self.device, non_blocking=True).float() / 255
        with torch.autocast(self.device.type, enabled=self.amp):
            preds = self.train_model(images)
            loss, parts = self.criterion(preds, targets.to(self.device))
        if self.dist.enabled:
            loss = loss * self.dist.world_size  # DDP averages gradients over ranks; upstream scales back
        self.scaler.scale(loss).backward()
        if ni - self.last_step >= self.accumulate:
            self.optimizer_step()
            self.last_step = ni
        self.iteration += 1
        self.loss_sum += parts.detach().float().cpu()
        self.batches += 1
        self.images_seen += len(images)
        mean = self.loss_sum / self.batches
        self.progress.note(f"box {mean[0]:.4f} obj {mean[1]:.4f} cls {mean[2]:.4f}")

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=GRAD_CLIP)
        if self.config.sparsity:  # after clipping: the penalty keeps its stated strength
            from ..optimize.sparsity import add_bn_l1_grad

            add_bn_l1_grad(self.model, self.config.sparsity)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def after_epoch(self) -> None:
        train_seconds = time.perf_counter() - self.epoch_start
        if self.dist.is_main:
            metrics = validate(self.ema.ema, self.data.val, self.config.imgsz, self.device)
            fitness = metrics.map50_95
            is_best = self.best_fitness is None or fitness >= self.best_fitness
            if is_best:
                self.best_fitness = fitness
            mean = (self.loss_sum / max(self.batches, 1)).tolist()
            row = {"epoch": self.epoch, "box_loss": mean[0], "obj_loss": mean[1], "cls_loss": mean[2],
                   "lr": float(self.optimizer.param_groups[1]["lr"]), "mAP50-95": metrics.map50_95,
                   "mAP50": metrics.map50, "epoch_seconds": time.perf_counter() - self.epoch_start,
                   "train_images_per_s": self.images_seen * self.dist.world_size / train_seconds}
            results.append_row(self.run / "results.csv", row)
            results.plot(self.run / "results.csv", self.run / "results.png")
            self.save_last(epochs_done=self.epoch + 1, metrics=metrics)
            if is_best:
                self._save_best()
            print(f"epoch {self.epoch + 1}/{self.config.epochs}: box {mean[0]:.4f} obj {mean[1]:.4f} "
                  f"cls {mean[2]:.4f}  mAP50-95 {metrics.map50_95 * 100:.2f} mAP50 {metrics.map50 * 100:.2f}  "
                  f"{row['train_images_per_s']:.2f} img/s", file=sys.stderr, flush=True)
        ddp.barrier(self.dist)

    def after_train(self) -> None:
        ddp.shutdown(self.dist)

    # ------------------------------------------------------------------ checkpoints

    def save_last(self, epochs_done: int | None = None, metrics=None, interrupted: bool = False) -> None:
        """``last`` = EMA (deployable) + training weights + optimiser; ``epoch`` = epochs completed."""
        if not self.dist.is_main or not hasattr(self, "optimizer") or not self.run.exists():
            return
        done = self.epoch if epochs_done is None else epochs_done
        save_training_state(
            self.run / "last", model=self.model, ema=self.ema.ema, optimizer=self.optimizer, epoch=done,
            best_fitness=self.best_fitness, ema_updates=self.ema.updates, hyp=self.config.hyp,
            metrics=self._metrics(metrics), data={"train": data_fingerprint(self.data.train)},
            meta={"names_source": str(self.config.weights)},
            extra={"config": asdict(self.config), "interrupted": interrupted})

    def _save_best(self) -> None:
        """``best`` = a copy of the just-written ``last`` (the model file is what deploys)."""
        import shutil

        for src, dst in zip(paths_for(self.run / "last"), paths_for(self.run / "best")):
            tmp = dst.with_name(f".{dst.name}.pending")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)

    @staticmethod
    def _metrics(metrics) -> dict:
        return {} if metrics is None else {"mAP50-95": metrics.map50_95, "mAP50": metrics.map50}

    # ------------------------------------------------------------------ set-up helpers

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _read_resume(self):
        state = load_training_state(Path(self.resume_dir) / "last")
        saved = state.extra.get("config")
        if not isinstance(saved, dict):
            raise EdgeYoloError(f"{self.resume_dir}: last.state.safetensors records no training configuration")
        weights = self.config.weights  # a WEIGHTS given with --resume must be the run's model
        self.config = TrainConfig(**{**saved, "out": str(self.resume_dir), "command": self.config.command})
        self.config.weights = weights
        self.run = Path(self.resume_dir)
        return state

    def _build_model(self, state) -> torch.nn.Module:
        c = self.config
        if state is not None and c.weights is None:
            model = copy.deepcopy(state.checkpoint.model)
        else:
            from ..model import build_from_cfg, load_model

            if c.weights is None:
                raise EdgeYoloError("give WEIGHTS (or --resume RUN_DIR)")
            loaded = load_model(c.weights)
            model = build_from_cfg(c.cfg, init_from=loaded)[0] if c.cfg else loaded.model
            model.names = list(loaded.names) if not c.cfg else model.names
        model = model.float()
        if c.act:
            from ..optimize.act_swap import swap_activation

            model = swap_activation(model, c.act)
        for p in model.parameters():
            p.requires_grad_(True)
        if c.freeze:
            frozen = tuple(f"model.{i}." for i in range(c.freeze))
            for name, p in model.named_parameters():
                if name.startswith(frozen):
                    p.requires_grad_(False)
        return model

    def _open_run_folder(self, resumed: bool) -> None:
        if not resumed:
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "results.csv").unlink(missing_ok=True)
        else:
            results.truncate(self.run / "results.csv", self.start_epoch)
        with (self.run / "command.txt").open("a") as f:
            f.write(self.config.command + "\n")
        (self.run / "hyp.yaml").write_text(yaml.safe_dump(dict(self.config.hyp), sort_keys=False))
        write_split(self.run / "val_split.json", self.data)


def command_line(argv: list[str]) -> str:
    return shlex.join(["edgeyolo", *argv])


class _EpochProgress:
    """Iterate a loader under a rich progress bar on stderr (losses, ETA); silent when not a TTY."""

    def __init__(self, loader, label: str, enabled: bool):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        self.loader, self.text = loader, ""
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
                            TimeRemainingColumn(), console=console, transient=False,
                            disable=not (enabled and console.is_terminal))
        self.task = self.bar.add_task(label, total=len(loader), losses="")

    def note(self, text: str) -> None:
        self.bar.update(self.task, advance=1, losses=text)

    def __iter__(self):
        with self.bar:
            yield from self.loader
