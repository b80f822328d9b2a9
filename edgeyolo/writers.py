"""Writing detections in the formats other tools read: YOLO txt labels and COCO results json.

- YOLO txt (YOLOv5 ``detect.py --save-txt --save-conf``): one file per image, one line per box,
  ``class x_center y_center width height confidence``, coordinates normalised to 0..1.
- COCO results json (what ``pycocotools``' ``loadRes`` and ``faster-coco-eval`` take): one list
  for all images of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EdgeYoloError
from .runtime.detections import Detections


def yolo_lines(dets: Detections, image_hw: tuple[int, int] | None = None) -> list[str]:
    """``class xc yc w h conf`` lines, normalised by the image size."""
    height, width = image_hw or dets.image_hw or (0, 0)
    if not height or not width:
        raise EdgeYoloError("YOLO txt labels need the image size (Detections.image_hw)")
    lines = []
    for (x1, y1, x2, y2), score, cls in zip(dets.xyxy, dets.confidence, dets.class_id):
        xc, yc = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{int(cls)} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f} {float(score):.5f}")
    return lines


def write_yolo_txt(path: str | Path, dets: Detections, image_hw: tuple[int, int] | None = None) -> Path:
    """One image's labels as a YOLO txt file (empty when nothing was detected, as YOLOv5 leaves none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = yolo_lines(dets, image_hw)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def coco_image_id(source: str | Path):
    """YOLOv5's convention: a numeric file stem is the COCO image id, any other stem stays a string."""
    stem = Path(source).stem
    return int(stem) if stem.isnumeric() else stem


def coco_results(dets: Detections, image_id, category_ids: list[int] | None = None) -> list[dict]:
    """One image's detections as COCO result entries; ``category_ids`` maps class index → category id."""
    results = []
    for (x1, y1, x2, y2), score, cls in zip(dets.xyxy, dets.confidence, dets.class_id):
        category = category_ids[int(cls)] if category_ids else int(cls)
        results.append({"image_id": image_id, "category_id": category,
                        "bbox": [round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)],
                        "score": round(float(score), 5)})
    return results


def write_coco_json(path: str | Path, results: list[dict]) -> Path:
    """All images' COCO result entries in one file, written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, path)
    return path
