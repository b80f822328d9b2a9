"""Labelled image sets for evaluation: YOLO layout (``images/`` + ``labels/``, or a data yaml) and COCO json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._optional import require
from .errors import EdgeYoloError
from .runtime.images import IMAGE_SUFFIXES
from .schema import Fields, check_int, check_number, loads_json, read_yaml_file

MAX_LABEL_BYTES = 16 << 20


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

    def check_classes(self, nc: int) -> None:
        """Every label's class must exist in the model (a class 500 in an 80-class set would silently lower mAP)."""
        limits = [(nc, f"a model with {nc} classes")]
        if self.names is not None:
            limits.append((len(self.names), f"the {len(self.names)} class names of {self.root}"))
        for sample in self.samples:
            top = int(sample.classes.max()) if sample.classes.size else -1
            for limit, what in limits:
                if top >= limit:
                    where = _label_path(sample.image) if sample.boxes is None else sample.image
                    raise EdgeYoloError(f"{where}: class {top} is out of range for {what} (0..{limit - 1})")


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
    if path.stat().st_size > MAX_LABEL_BYTES:
        raise EdgeYoloError(f"{path}: larger than {MAX_LABEL_BYTES >> 20} MB; not a label file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise EdgeYoloError(f"{path}: not a text label file") from None
    if "\x00" in text:
        raise EdgeYoloError(f"{path}: not a text label file")
    boxes, classes = [], []
    for number, line in enumerate(text.splitlines(), start=1):
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
    require("yaml", extra="eval", purpose="reading a data yaml")
    data = read_yaml_file(path, "data yaml")
    if not isinstance(data, dict) or "val" not in data:
        raise EdgeYoloError(f"{path}: a data yaml needs a 'val' entry")
    fields = Fields(data, str(path))
    base = Path(fields.string("path", default="") or path.parent)
    if not base.is_absolute():
        base = path.parent / base
    val = base / fields.string("val", required=True)
    names = _yaml_names(data.get("names"), path)
    if val.is_file() and val.suffix == ".txt":
        raise EdgeYoloError(f"{val}: image-list splits are not supported; point 'val' at an images folder")
    dataset = _yolo_folder(val, names)
    dataset.root = str(path)
    return dataset


def _yaml_names(names, path: Path) -> list[str] | None:
    """``names`` as a list or an {index: name} mapping of strings, or absent."""
    if names is None:
        return None
    if isinstance(names, dict):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in names) or \
                sorted(names) != list(range(len(names))):
            raise EdgeYoloError(f"{path}: names must map the indices 0..N-1 to class names")
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
        raise EdgeYoloError(f"{path}: names must be a list of class names")
    return [str(n) for n in names]


def _coco_json(path: Path) -> Dataset:
    """COCO instances json; images beside it in ``images/`` or in the json's own folder.

    Category ids are mapped to contiguous class indices in id order (COCO's 80 classes → 0..79).
    """
    try:
        data = loads_json(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EdgeYoloError(f"{path}: not a COCO instances json ({str(exc)[:200]})") from None
    top = Fields(data, str(path))
    categories = _coco_list(top, "categories", ("id", "name"))
    images = _coco_list(top, "images", ("id", "file_name"))
    for c in categories:
        check_int(c["id"], f"{path}: categories id")
        if not isinstance(c["name"], str):
            raise EdgeYoloError(f"{path}: category {c['id']} has no name string")
    categories = sorted(categories, key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict = {}
    for img in images:
        if not isinstance(img["file_name"], str) or not isinstance(img["id"], (int, str)) or img["id"] in per_image:
            raise EdgeYoloError(f"{path}: image {img['id']!r}: needs a unique id and a file_name string")
        per_image[img["id"]] = ([], [])
    for ann in _coco_list(top, "annotations", ("image_id", "category_id", "bbox"), required=False):
        if ann.get("iscrowd", 0) or ann["image_id"] not in per_image:
            continue
        if ann["category_id"] not in index:
            raise EdgeYoloError(f"{path}: annotation {ann.get('id', '?')} has category_id {ann['category_id']!r}, "
                                "which is not in its categories")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise EdgeYoloError(f"{path}: annotation {ann.get('id', '?')}: bbox must be [x, y, w, h]")
        what = f"{path}: annotation {ann.get('id', '?')} bbox"
        x, y = (check_number(v, what) for v in bbox[:2])
        w, h = (check_number(v, what, lo=0) for v in bbox[2:])
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


def _coco_list(top: Fields, key: str, needs: tuple, required: bool = True) -> list:
    """A COCO json's list of objects, each with the keys ``needs``."""
    items = top.raw(key, [], required=required)
    if not isinstance(items, list) or not all(isinstance(i, dict) and all(k in i for k in needs) for i in items):
        raise EdgeYoloError(f"{top.where}: not a COCO instances json ('{key}' must be a list of objects "
                            f"with {', '.join(needs)})")
    return items
