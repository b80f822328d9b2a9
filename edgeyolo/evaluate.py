"""COCO mAP of a ``Detector`` on a labelled dataset, scored by a maintained COCO evaluator.

Inference settings follow YOLOv5's val.py (conf 0.001, IoU 0.6, max_det 300,
multi-label NMS), so figures are comparable with upstream's.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ._optional import missing_message
from .datasets import Dataset
from .errors import EdgeYoloError
from .log import log
from .runtime.images import read_image_reduced
from .runtime.postprocess import rescale_boxes

VAL_CONF, VAL_IOU, VAL_MAX_DET = 0.001, 0.6, 300


@dataclass
class EvalResult:
    map50_95: float
    map50: float
    images: int
    boxes: int
    predictions: int
    skipped: int
    seconds: float
    per_class: dict[str, float] | None = field(default=None)

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["per_class"] is None:
            del data["per_class"]
        return data


def evaluate(detector, dataset: Dataset, per_class: bool = False,
             progress: Callable[[int], None] | None = None, limit: int | None = None) -> EvalResult:
    """Run ``detector`` over ``dataset`` and score it with COCO mAP50-95 / mAP50 (fractions 0–1)."""
    start = time.perf_counter()
    images, annotations, predictions = [], [], []
    skipped = 0
    samples = dataset.samples[:limit] if limit else dataset.samples
    # as detect() on a path: large JPEGs decoded at reduced scale where the detector does so
    reduced_fit = detector.letterbox.imgsz if getattr(detector, "reduced_decode", False) else None
    for image_id, sample in enumerate(samples):
        try:
            image, (height, width) = read_image_reduced(sample.image, reduced_fit)
        except EdgeYoloError as exc:
            skipped += 1
            log.warning("skipping %s", exc)
            if progress:
                progress(1)
            continue
        images.append({"id": image_id, "width": width, "height": height, "file_name": sample.image.name})
        for box, cls in zip(sample.boxes_for(height, width), sample.classes):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        dets = detector.detect(image, conf=VAL_CONF, iou=VAL_IOU, max_det=VAL_MAX_DET, multi_label=True)
        if image.shape[:2] != (height, width):  # read at reduced scale: boxes back to the file's size
            dets.xyxy = rescale_boxes(dets.xyxy, image.shape[:2], (height, width))
        for box, score, cls in zip(dets.xyxy, dets.confidence, dets.class_id):
            x1, y1, x2, y2 = (float(v) for v in box)
            predictions.append({"image_id": image_id, "category_id": int(cls), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "score": float(score)})
        if progress:
            progress(1)
    if skipped:
        log.warning("%d unreadable image(s) skipped", skipped)
    if not images:
        raise EdgeYoloError(f"{dataset.root}: no readable images to evaluate")
    names = detector.names
    map50_95, map50, classes_ap = coco_map(images, annotations, predictions, names)
    return EvalResult(
        map50_95=map50_95, map50=map50, images=len(images), boxes=len(annotations), predictions=len(predictions),
        skipped=skipped, seconds=round(time.perf_counter() - start, 2), per_class=classes_ap if per_class else None,
    )


def coco_map(images: list[dict], annotations: list[dict], predictions: list[dict], names: list[str]):
    """(mAP50-95, mAP50, {class name: AP50-95}) with faster-coco-eval's COCOeval (pycocotools' where absent)."""
    used = sorted({a["category_id"] for a in annotations} | {p["category_id"] for p in predictions})
    categories = [{"id": c, "name": names[c] if c < len(names) else str(c)} for c in used]
    gt_dict = {"images": images, "annotations": annotations, "categories": categories}
    COCO, COCOeval = _evaluator()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_dict) if COCO.__module__.startswith("faster_coco_eval") else _pycocotools_gt(COCO, gt_dict)
        if not predictions:
            return 0.0, 0.0, {c["name"]: 0.0 for c in categories}
        dt = gt.loadRes(predictions)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = np.asarray(ev.eval["precision"])  # [iou thr, recall, class, area, max dets]
    per_class = {}
    for k, cat in enumerate(categories):
        p = precision[:, :, k, 0, -1]
        per_class[cat["name"]] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return float(ev.stats[0]), float(ev.stats[1]), per_class


def _evaluator():
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    except ImportError:
        raise EdgeYoloError(missing_message("faster_coco_eval", purpose="evaluation")) from None


def _pycocotools_gt(COCO, gt_dict):
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    return gt
