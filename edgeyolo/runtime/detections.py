"""``Detections``: one plain value type for one image's results, numpy arrays inside."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import cv2
import numpy as np

from .._optional import require


@dataclass
class Detections:
    """Boxes in the caller's pixel coordinates (``xyxy``), with ``confidence`` and ``class_id``."""

    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    class_id: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    names: list[str] = field(default_factory=list)
    image_hw: tuple[int, int] | None = None

    @classmethod
    def from_rows(cls, rows: np.ndarray, names, image_hw=None) -> "Detections":
        """From ``(K, 6)`` rows of x1, y1, x2, y2, score, class."""
        return cls(xyxy=rows[:, :4].astype(np.float32), confidence=rows[:, 4].astype(np.float32),
                   class_id=rows[:, 5].astype(np.int64), names=list(names), image_hw=image_hw)

    def __len__(self) -> int:
        return len(self.confidence)

    def __getitem__(self, index) -> "Detections":
        """Filter with a boolean mask, an index array or a slice: ``dets[dets.confidence > 0.5]``."""
        if isinstance(index, (int, np.integer)):
            index = [index]
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index], self.names, self.image_hw)

    @property
    def class_name(self) -> list[str]:
        return [self.names[c] if 0 <= c < len(self.names) else str(c) for c in self.class_id]

    def to_list(self) -> list[dict]:
        return [
            {"class_id": int(c), "class_name": n, "confidence": round(float(s), 5),
             "xyxy": [round(float(v), 2) for v in box]}
            for box, s, c, n in zip(self.xyxy, self.confidence, self.class_id, self.class_name)
        ]

    def to_json(self) -> str:
        return json.dumps(self.to_list())

    def __str__(self) -> str:
        if not len(self):
            return "no detections"
        lines = [f"{len(self)} detections"]
        for d in self.to_list():
            x1, y1, x2, y2 = d["xyxy"]
            lines.append(f"  {d['class_name']:<16} {d['confidence']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
        return "\n".join(lines)

    def draw(self, image: np.ndarray) -> np.ndarray:
        """A copy of the BGR ``image`` with boxes and labels drawn on it (labels always inside the image)."""
        canvas = image.copy()
        height, width = canvas.shape[:2]
        thickness = max(1, round((height + width) / 600))
        scale, text_thickness = thickness / 3, max(thickness - 1, 1)
        for box, score, cls, name in zip(self.xyxy, self.confidence, self.class_id, self.class_name):
            color = _color(int(cls))
            p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
            cv2.rectangle(canvas, p1, p2, color, thickness, cv2.LINE_AA)
            label = f"{name} {score:.2f}"
            (tw, th), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, text_thickness)
            x, y, w, h = label_box(p1, (tw, th + baseline), (height, width))
            cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), color, -1, cv2.LINE_AA)
            cv2.putText(canvas, label, (x + LABEL_PAD, y + LABEL_PAD + th), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (255, 255, 255), text_thickness, cv2.LINE_AA)
        return canvas

    def to_supervision(self):
        """This as a ``supervision.Detections`` (class names in ``data["class_name"]``)."""
        sv = require("supervision", purpose="Detections.to_supervision()")
        return sv.Detections(xyxy=self.xyxy.astype(np.float32), confidence=self.confidence.astype(np.float32),
                             class_id=self.class_id.astype(int), data={"class_name": np.array(self.class_name)})

    @classmethod
    def from_supervision(cls, detections, names=None, image_hw=None) -> "Detections":
        """From a ``supervision.Detections``; ``names`` default to its ``data["class_name"]`` where present."""
        count = len(detections.xyxy)
        confidence = detections.confidence if detections.confidence is not None else np.ones(count)
        class_id = detections.class_id if detections.class_id is not None else np.zeros(count)
        class_id = np.asarray(class_id, dtype=np.int64)
        if names is None:
            names = _names_from(class_id, getattr(detections, "data", {}).get("class_name"))
        return cls(xyxy=np.asarray(detections.xyxy, dtype=np.float32).reshape(-1, 4),
                   confidence=np.asarray(confidence, dtype=np.float32), class_id=class_id, names=list(names),
                   image_hw=image_hw)


LABEL_PAD = 2


def label_box(corner: tuple[int, int], text_size: tuple[int, int], image_hw: tuple[int, int]):
    """(x, y, w, h) of a box's label: above its top-left corner, or just inside when that would leave
    the image; always shifted to lie wholly within the image (as far as the image is larger)."""
    (x1, y1), (tw, th), (height, width) = corner, text_size, image_hw
    w, h = tw + 2 * LABEL_PAD, th + 2 * LABEL_PAD
    y = y1 - h if y1 - h >= 0 else y1
    x = min(max(x1, 0), max(width - w, 0))
    y = min(max(y, 0), max(height - h, 0))
    return x, y, w, h


def _names_from(class_id: np.ndarray, class_name) -> list[str]:
    if class_name is None or not len(class_id):
        return []
    names = [str(i) for i in range(int(class_id.max()) + 1)]
    for i, name in zip(class_id, class_name):
        if i >= 0:
            names[int(i)] = str(name)
    return names


_PALETTE = ["FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
            "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7"]


def _color(index: int) -> tuple[int, int, int]:
    hex_rgb = _PALETTE[index % len(_PALETTE)]
    r, g, b = (int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))
    return (b, g, r)
