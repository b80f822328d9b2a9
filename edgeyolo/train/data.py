"""Training data: the YOLO layouts ``eval`` reads, as a torch ``Dataset`` with YOLOv5's batch format.

A batch is ``(images, targets)``: images ``B×3×H×W`` uint8 RGB (the trainer turns them into
float /255 on its device, so workers ship a quarter of the bytes) and targets ``(N, 6)`` rows
``image index, class, cx, cy, w, h`` normalised to the input size, as the loss expects.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..datasets import Dataset, _label_path, _yolo_folder, load_dataset
from ..errors import EdgeYoloError
from ..runtime.images import read_image
from ..schema import read_yaml_file
from .augment import Augmenter


@dataclass
class TrainData:
    """The train set, the set used for validation / best selection, and where the latter came from."""

    train: Dataset
    val: Dataset
    val_source: str  # "val split of <yaml>", "--val-data <spec>" or "held-out 10% of the train set (seed 0)"
    held_out: list[str] | None = None  # image paths held out of ``train`` for validation


def load_train_data(spec: str | Path, val_spec: str | Path | None = None, val_split: float = 0.1,
                    seed: int = 0) -> TrainData:
    """Read the train set of ``spec`` (YOLO folder or data yaml) and pick the validation set.

    Validation comes from ``val_spec``, else the yaml's ``val`` entry, else a seeded ``val_split``
    fraction held out of the train set (so ``best`` is never chosen on a reported set).
    """
    path = Path(spec)
    if not path.exists():
        raise EdgeYoloError(f"{spec}: no such dataset folder or data yaml")
    val, val_source = None, None
    if path.suffix in (".yaml", ".yml"):
        train, splits = _yaml_splits(path)
        if "val" in splits and val_spec is None:
            val, val_source = splits["val"], f"the 'val' split of {path}"
    elif path.is_dir():
        train = _yolo_folder(path)
    else:
        raise EdgeYoloError(f"{spec}: training data must be a YOLO-layout folder or a data yaml")
    _check_train_set(train)
    if val_spec is not None:
        val, val_source = load_dataset(val_spec), f"--val-data {val_spec}"
    held_out = None
    if val is None:
        train, val, held_out = _hold_out(train, val_split, seed)
        val_source = f"held-out {val_split:.0%} of the train set (seed {seed})"
    return TrainData(train=train, val=val, val_source=val_source, held_out=held_out)


def _yaml_splits(path: Path) -> tuple[Dataset, dict[str, Dataset]]:
    """A YOLOv5 data yaml's ``train`` (required) and ``val`` (optional) image folders."""
    data = read_yaml_file(path, "data yaml")
    if not isinstance(data, dict) or not data.get("train"):
        raise EdgeYoloError(f"{path}: a data yaml for training needs a 'train' entry")
    base = Path(data.get("path") or path.parent)
    if not base.is_absolute():
        base = path.parent / base
    names = data.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    splits = {}
    for key in ("train", "val"):
        if not data.get(key):
            continue
        if not isinstance(data[key], str):
            raise EdgeYoloError(f"{path}: '{key}' must be one images folder (lists are not supported)")
        folder = base / data[key]
        if not folder.is_dir():
            raise EdgeYoloError(f"{folder}: the '{key}' split of {path} is not an images folder")
        splits[key] = _yolo_folder(folder, names)
    return splits["train"], splits


def _check_train_set(train: Dataset) -> None:
    if not any(len(s.classes) for s in train.samples):
        raise EdgeYoloError(f"{train.root}: the train set has no labelled boxes")


def _hold_out(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    if not 0 < fraction < 1:
        raise EdgeYoloError(f"--val-split must be between 0 and 1, not {fraction}")
    order = np.random.default_rng(seed).permutation(len(train.samples))
    n_val = max(1, int(round(len(order) * fraction)))
    if len(order) - n_val < 1:
        raise EdgeYoloError(f"{train.root}: {len(order)} image(s) are too few to hold out a validation split")
    val_idx, train_idx = set(order[:n_val].tolist()), order[n_val:]
    val = Dataset(root=train.root, samples=[train.samples[i] for i in sorted(val_idx)], names=train.names)
    kept = Dataset(root=train.root, samples=[train.samples[i] for i in sorted(train_idx)], names=train.names)
    return kept, val, [str(s.image) for s in val.samples]


def data_fingerprint(dataset: Dataset) -> str:
    """A cheap identity of a set (image and label names, sizes): recorded in checkpoints."""
    import hashlib

    digest = hashlib.sha256()
    for s in dataset.samples:
        label = _label_path(s.image)
        digest.update(f"{s.image.name}:{s.image.stat().st_size}:{label.stat().st_size if label.exists() else -1}\n"
                      .encode())
    return digest.hexdigest()


def write_split(path: Path, data: TrainData) -> None:
    """Record which images validated the run (``val_split.json`` in the run folder)."""
    path.write_text(json.dumps({"val_source": data.val_source, "held_out": data.held_out}, indent=1) + "\n")


class TrainSet(torch.utils.data.Dataset):
    """Images + labels → augmented ``imgsz``² samples: ``(3×H×W uint8 RGB, (K, 5) cls cx cy w h)``."""

    def __init__(self, dataset: Dataset, imgsz: int, augmenter: Augmenter, nc: int):
        self.samples, self.imgsz, self.augmenter = dataset.samples, imgsz, augmenter
        bad = next(((s.image, int(s.classes.max())) for s in self.samples if len(s.classes) and s.classes.max() >= nc),
                   None)
        if bad:
            raise EdgeYoloError(f"{_label_path(bad[0])}: class {bad[1]} but the model has {nc} classes")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """A BGR image resized to a long side of ``imgsz`` (as YOLOv5's load_image), with pixel boxes."""
        sample = self.samples[index]
        image = read_image(sample.image)
        h, w = image.shape[:2]
        boxes = sample.boxes_for(h, w)
        if self.augmenter.enabled:  # the letterbox (augment off) resizes from the original, as eval does
            r = self.imgsz / max(h, w)
            if r != 1:
                image = cv2.resize(image, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_LINEAR)
                boxes = boxes * np.array([image.shape[1] / w, image.shape[0] / h] * 2)
        return image, boxes, sample.classes

    def __getitem__(self, index: int):
        image, boxes, classes = self.augmenter(index, len(self), self.load)
        s = self.imgsz
        labels = np.zeros((len(classes), 5), np.float32)
        if len(classes):
            boxes = boxes.clip(0, s)
            labels[:, 0] = classes
            labels[:, 1] = (boxes[:, 0] + boxes[:, 2]) / 2 / s
            labels[:, 2] = (boxes[:, 1] + boxes[:, 3]) / 2 / s
            labels[:, 3] = (boxes[:, 2] - boxes[:, 0]) / s
            labels[:, 4] = (boxes[:, 3] - boxes[:, 1]) / s
        rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
        return torch.from_numpy(rgb), torch.from_numpy(labels)


def collate(batch):
    """Stack images; prefix each label row with its image's index in the batch."""
    images, labels = zip(*batch)
    targets = [torch.cat((torch.full((len(lab), 1), i, dtype=torch.float32), lab), 1) for i, lab in enumerate(labels)]
    return torch.stack(images), torch.cat(targets) if targets else torch.zeros((0, 6))


def _seed_worker(worker_id: int) -> None:
    """Each worker (each epoch) gets its own stream, derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    info.dataset.augmenter.reseed(seed)


def make_loader(train_set: TrainSet, batch: int, workers: int, seed: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Shuffled batches (a ``DistributedSampler`` shards them across ranks when ``world_size > 1``)."""
    if batch > len(train_set):
        raise EdgeYoloError(f"--batch {batch} is larger than the train set ({len(train_set)} images)")
    per_rank = batch // world_size
    if per_rank < 1:
        raise EdgeYoloError(f"--batch {batch} is smaller than the number of processes ({world_size})")
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed) if world_size > 1 else None
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                      collate_fn=collate, worker_init_fn=_seed_worker if workers else None, generator=generator,
                      drop_last=False, pin_memory=torch.cuda.is_available(), persistent_workers=False)


def write_augment_samples(train_set: TrainSet, count: int, folder: Path, names: list[str]) -> list[Path]:
    """``count`` training samples as the network sees them, boxes drawn, as JPEGs in ``folder``."""
    from ..runtime.detections import Detections

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(count):
        image, labels = train_set[k % len(train_set)]
        bgr = np.ascontiguousarray(image.numpy().transpose(1, 2, 0)[:, :, ::-1])
        s = train_set.imgsz
        cls, cx, cy, w, h = labels.numpy().T if len(labels) else (np.zeros((5, 0)))
        rows = np.stack(((cx - w / 2) * s, (cy - h / 2) * s, (cx + w / 2) * s, (cy + h / 2) * s,
                         np.ones_like(cls), cls), 1)
        drawn = Detections.from_rows(rows.astype(np.float32), names, image_hw=(s, s)).draw(bgr)
        path = folder / f"augment_{k:03d}.jpg"
        cv2.imwrite(str(path), drawn)
        written.append(path)
    return written
