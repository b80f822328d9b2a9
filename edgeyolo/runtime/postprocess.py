"""Head decoding, class-aware NMS and box rescaling in numpy, mirroring YOLOv5's own."""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import LetterboxInfo

MAX_WH = 7680  # class offset for batched NMS (as YOLOv5)
MAX_NMS = 30000  # boxes kept for NMS, highest scores first


def decode_sigmoid_head(raw: np.ndarray, input_hw: tuple[int, int], strides, anchors) -> np.ndarray:
    """Turn a sigmoid head ``(B, N, 5+nc)`` into YOLOv5's decoded layout (boxes in input pixels).

    Rows follow (level, anchor, y, x); ``anchors`` are per level, in pixels, flat (w0, h0, w1, h1, ...).
    """
    grid_xy, anchor_wh, stride = _grids(input_hw, tuple(strides), tuple(map(tuple, anchors)))
    out = raw.astype(np.float32, copy=True)
    out[..., 0:2] = (out[..., 0:2] * 2 + grid_xy) * stride
    out[..., 2:4] = (out[..., 2:4] * 2) ** 2 * anchor_wh
    return out


def head_candidates(raw: np.ndarray, conf: float, input_hw: tuple[int, int], head: str, strides,
                    anchors) -> np.ndarray:
    """One image's head rows ``(N, 5+nc)`` whose objectness passes ``conf``, in YOLOv5's decoded layout.

    Filtering first means a sigmoid head's grid/anchor arithmetic runs on the few dozen
    candidates, not all N rows (25,200 at 640); the numbers are the same as decoding all.
    """
    if raw.dtype != np.float32:
        raw = raw.astype(np.float32)
    index = np.flatnonzero(raw[:, 4] > conf)
    rows = raw[index]  # a copy of the candidates only
    if head == "sigmoid":
        grid_xy, anchor_wh, stride = _grids(input_hw, tuple(strides), tuple(map(tuple, anchors)))
        rows[:, 0:2] = (rows[:, 0:2] * 2 + grid_xy[index]) * stride[index]
        rows[:, 2:4] = (rows[:, 2:4] * 2) ** 2 * anchor_wh[index]
    return rows


_GRID_CACHE: dict = {}


def _grids(input_hw, strides, anchors):
    key = (tuple(input_hw), strides, anchors)
    if key not in _GRID_CACHE:
        grid_xy, anchor_wh, stride_col = [], [], []
        h, w = input_hw
        for s, level_anchors in zip(strides, anchors):
            ny, nx = h // s, w // s
            pairs = np.asarray(level_anchors, dtype=np.float32).reshape(-1, 2)
            yv, xv = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
            cells = np.stack((xv, yv), -1).reshape(-1, 2) - 0.5
            for anchor in pairs:
                grid_xy.append(cells)
                anchor_wh.append(np.broadcast_to(anchor, cells.shape))
                stride_col.append(np.full((len(cells), 1), s, dtype=np.float32))
        _GRID_CACHE[key] = tuple(np.concatenate(x).astype(np.float32) for x in (grid_xy, anchor_wh, stride_col))
    return _GRID_CACHE[key]


def xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    xyxy = np.empty_like(xywh)
    half = xywh[:, 2:4] / 2
    xyxy[:, 0:2] = xywh[:, 0:2] - half
    xyxy[:, 2:4] = xywh[:, 0:2] + half
    return xyxy


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS over xyxy boxes (torchvision's semantics); indices kept, best first.

    OpenCV's C++ ``NMSBoxes`` (highest score first, ties in input order, a box dropped when
    its IoU with a kept one exceeds the threshold): the same boxes in the same order as a
    Python loop, several times faster on the thousands of boxes of ``conf 0.001``. Scores
    must be positive, as every score that passed a confidence threshold is.
    """
    if not len(scores):
        return np.zeros((0,), np.int64)
    xywh = np.asarray(boxes, dtype=np.float32).copy()
    xywh[:, 2:4] -= xywh[:, 0:2]
    kept = cv2.dnn.NMSBoxes(xywh, np.asarray(scores, dtype=np.float32), 0.0, float(iou_threshold))
    return np.asarray(kept, dtype=np.int64).reshape(-1)


def non_max_suppression(
    pred: np.ndarray,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    classes=None,
) -> np.ndarray:
    """One image's decoded head ``(N, 5+nc)`` → ``(K, 6)`` rows of x1, y1, x2, y2, score, class.

    Scores are objectness × class probability. ``multi_label`` keeps a box once per class
    above the threshold (as YOLOv5's val.py); otherwise only its best class (as detect.py).
    """
    x = pred[pred[:, 4] > conf_thres]
    if not len(x):
        return np.zeros((0, 6), dtype=np.float32)
    cls_scores = x[:, 5:] * x[:, 4:5]
    boxes = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = np.nonzero(cls_scores > conf_thres)
        boxes, scores, labels = boxes[i], cls_scores[i, j], j
    else:
        labels = cls_scores.argmax(1)
        scores = cls_scores[np.arange(len(labels)), labels]
        keep = scores > conf_thres
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if classes is not None:
        keep = np.isin(labels, np.asarray(classes))
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if not len(scores):
        return np.zeros((0, 6), dtype=np.float32)
    if len(scores) > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, labels = boxes[top], scores[top], labels[top]
    offsets = 0 if agnostic else labels[:, None].astype(np.float32) * MAX_WH
    kept = nms(boxes + offsets, scores, iou_thres)[:max_det]
    return np.concatenate(
        (boxes[kept], scores[kept, None], labels[kept, None].astype(np.float32)), axis=1
    ).astype(np.float32)


def scale_boxes(xyxy: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map boxes from the letterboxed input back to the original image, clipped to it."""
    out = xyxy.copy()
    out[:, [0, 2]] -= info.pad[0]
    out[:, [1, 3]] -= info.pad[1]
    out /= info.ratio
    h, w = info.orig_hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def rescale_boxes(xyxy: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Boxes on an image of ``from_hw`` → the same image at ``to_hw`` (a reduced-scale read's full size)."""
    out = xyxy.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] * np.float32(to_hw[1] / from_hw[1])).clip(0, to_hw[1])
    out[:, [1, 3]] = (out[:, [1, 3]] * np.float32(to_hw[0] / from_hw[0])).clip(0, to_hw[0])
    return out
