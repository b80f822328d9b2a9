"""Labelled image sets for evaluation: YOLO layout (``images/`` + ``labels/``, or a data yaml) and COCO json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._optional import require
from .errors import EdgeYoloError
from .runtime.images import IMAGE_SUFFIXES


@dataclass
class Sample:
    image: Path
    boxes: np.ndarray | None  # (K, 4) pixel xyxy, or None when given normalised (see ``normalised``)
    classes: np.ndarray  # (K,) int
    normalised: np.ndarray | None = None  # (K, 4) YOLO cx, cy, w, h in 0..1, scaled once the image size is known

    def boxes_for(self, height: int, width: int) -> np.ndarray:
        if self.boxes is not None:
            return self.boxes
        cx, cy, w, h = self.normalised.T
        return np.stack(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), 1)


@dataclass
class Dataset:
    root: str
    samples: list[Sample]
    names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)


def load_dataset(spec: str | Path) -> Dataset:
    """A folder in YOLO layout, a YOLOv5 data yaml (its ``val`` split), or a COCO ``instances*.json``."""
    path = Path(spec)
    if not path.exists():
        raise EdgeYoloError(f"{spec}: no such dataset folder or file")
    if path.suffix == ".json":
        return _coco_json(path)
    if path.suffix in (".yaml", ".yml"):
        return _data_yaml(path)
    return _yolo_folder(path)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _yolo_folder(root: Path, names=None) -> Dataset:
    images_dir = root / "images" if (root / "images").is_dir() else root
    images = _image_files(images_dir)
    if not images:
        raise EdgeYoloError(f"{root}: no images found (expected images/ and labels/ folders)")
    samples = []
    labelled = 0
    for image in images:
        label = _label_path(image)
        if label.is_file():
            labelled += 1
        normalised, classes = read_yolo_labels(label) if label.is_file() else (np.zeros((0, 4)), np.zeros(0, int))
        samples.append(Sample(image=image, boxes=None, classes=classes, normalised=normalised))
    if not labelled:
        raise EdgeYoloError(f"{root}: no label files found for its {len(images)} images (expected labels/*.txt)")
    return Dataset(root=str(root), samples=samples, names=names)


def _label_path(image: Path) -> Path:
    """YOLOv5's rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_yolo_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``class cx cy w h`` lines (normalised); a malformed line is an error naming file and line."""
    boxes, classes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError(f"expected 5 fields, got {len(fields)}")
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
            if cls < 0 or any(not 0 <= v <= 1.0001 for v in values):
                raise ValueError("class must be >= 0 and coordinates within 0..1")
        except ValueError as exc:
            raise EdgeYoloError(f"{path}:{number}: malformed label line {line.strip()!r} ({exc})") from None
        classes.append(cls)
        boxes.append(values)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def _data_yaml(path: Path) -> Dataset:
    yaml = require("yaml", extra="eval", purpose="reading a data yaml")

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgeYoloError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or "val" not in data:
        raise EdgeYoloError(f"{path}: a data yaml needs a 'val' entry")
    base = Path(data.get("path") or path.parent)
    if not base.is_absolute():
        base = path.parent / base
    val = base / data["val"]
    names = data.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if val.is_file() and val.suffix == ".txt":
        raise EdgeYoloError(f"{val}: image-list splits are not supported; point 'val' at an images folder")
    dataset = _yolo_folder(val, names)
    dataset.root = str(path)
    return dataset


def _coco_json(path: Path) -> Dataset:
    """COCO instances json; images beside it in ``images/`` or in the json's own folder.

    Category ids are mapped to contiguous class indices in id order (COCO's 80 classes → 0..79).
    """
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EdgeYoloError(f"{path}: not a COCO instances json ({exc})") from None
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict = {img["id"]: ([], []) for img in images}
    for ann in data.get("annotations", []):
        if ann.get("iscrowd", 0) or ann["image_id"] not in per_image:
            continue
        x, y, w, h = ann["bbox"]
        per_image[ann["image_id"]][0].append([x, y, x + w, y + h])
        per_image[ann["image_id"]][1].append(index[ann["category_id"]])
    folder = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    samples = []
    for img in images:
        boxes, classes = per_image[img["id"]]
        samples.append(Sample(image=folder / img["file_name"], boxes=np.asarray(boxes, float).reshape(-1, 4),
                              classes=np.asarray(classes, np.int64)))
    if not samples:
        raise EdgeYoloError(f"{path}: lists no images")
    return Dataset(root=str(path), samples=samples, names=[c["name"] for c in categories])
