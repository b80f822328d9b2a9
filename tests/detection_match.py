"""Matching one backend's detections with another's, for the parity tests (each states its own tolerances)."""

from __future__ import annotations

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box ``a`` with each row of ``b``."""
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def unmatched(reference, candidate, *, score_tol: float, min_iou: float = 0.0, box_tol_px: float | None = None,
              min_score: float = 0.0) -> list:
    """Reference detections (score >= ``min_score``) that no candidate of the same class reproduces.

    A candidate reproduces one when its score is within ``score_tol``, its IoU is at least ``min_iou`` and,
    if ``box_tol_px`` is given, every box corner is within that many pixels.
    """
    missing = []
    for box, score, cls in zip(reference.xyxy, reference.confidence, reference.class_id):
        if score < min_score:
            continue
        same = candidate.class_id == cls
        boxes, scores = candidate.xyxy[same], candidate.confidence[same]
        ok = (np.abs(scores - score) <= score_tol) & (iou(box, boxes) >= min_iou) if len(boxes) else np.zeros(0, bool)
        if box_tol_px is not None and len(boxes):
            ok &= np.abs(boxes - box).max(axis=1) <= box_tol_px
        if not ok.any():
            missing.append((int(cls), float(score), box.round(2).tolist()))
    return missing
