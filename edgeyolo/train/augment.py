"""Training augmentation: YOLOv5's default recipe plus albumentations' extras, values from the hyp dict.

The recipe, in upstream's order: mosaic (4 images on a 2×-size canvas) → random affine
(scale / translate / degrees / shear, perspective) cropped to the training size → the
photometric extras (blur, median blur, gray, CLAHE, brightness/contrast, gamma, JPEG, colour
jitter) → HSV gain jitter → vertical / horizontal flip, rotate-90. Every geometric step is an
albumentations transform, so boxes are moved, clipped and filtered by it (pascal_voc pixels);
only mosaic (a layout, not a transform) and YOLOv5's multiplicative HSV gains are our own.

Samples handed in and out are ``(BGR uint8 image, (K, 4) xyxy pixel boxes, (K,) classes)``.
"""

from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
import numpy as np

from ..runtime.preprocess import PAD_COLOR, LetterboxSettings, letterbox

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]
AUGMENT_MODES = ("default", "none")

# Upstream's box_candidates: boxes under 2 px a side or keeping < 10 % of their area are dropped.
_BOXES = dict(format="pascal_voc", label_fields=["classes"], min_width=2, min_height=2, min_visibility=0.1,
              clip=True, filter_invalid_bboxes=True)


def letterbox_sample(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, imgsz: int) -> Sample:
    """The runtime's letterbox (as ``eval`` feeds the network), boxes mapped with it."""
    boxed, info = letterbox(image, LetterboxSettings(imgsz=(imgsz, imgsz)))
    moved = boxes * info.ratio + np.array([info.pad[0], info.pad[1]] * 2)
    return boxed, moved.reshape(-1, 4), classes


def hsv_jitter(image: np.ndarray, gains: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """YOLOv5's colour jitter: hue, saturation and value each scaled by a random gain in 1 ± g."""
    if not any(gains):
        return image
    factors = rng.uniform(-1, 1, 3) * np.asarray(gains) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    luts = (((x * factors[0]) % 180).astype(np.uint8), np.clip(x * factors[1], 0, 255).astype(np.uint8),
            np.clip(x * factors[2], 0, 255).astype(np.uint8))
    merged = cv2.merge([cv2.LUT(c, lut) for c, lut in zip((hue, sat, val), luts)])
    return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)


def mosaic(samples: list[Sample], imgsz: int, rng: np.random.Generator) -> Sample:
    """Four samples (long side ``imgsz``) around a random centre of a ``2·imgsz`` grey canvas."""
    size = 2 * imgsz
    canvas = np.full((size, size, 3), PAD_COLOR, dtype=np.uint8)
    xc, yc = (int(v) for v in rng.uniform(imgsz / 2, 3 * imgsz / 2, 2))
    all_boxes, all_classes = [], []
    for k, (image, boxes, classes) in enumerate(samples):
        h, w = image.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # top-left, top-right, bottom-left, bottom-right
        y0 = yc - h if k in (0, 1) else yc
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        canvas[cy0:cy1, cx0:cx1] = image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        all_boxes.append(boxes + np.array([x0, y0, x0, y0]))
        all_classes.append(classes)
    boxes = np.concatenate(all_boxes).reshape(-1, 4).clip(0, size)
    classes = np.concatenate(all_classes)
    keep = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
    return canvas, boxes[keep], classes[keep]


class Augmenter:
    """One training sample from ``load(index)`` (image resized to a long side of ``imgsz``)."""

    def __init__(self, hyp: dict, imgsz: int, mode: str = "default", seed: int = 0):
        if mode not in AUGMENT_MODES:
            raise ValueError(f"augment mode must be one of {AUGMENT_MODES}")
        self.hyp, self.imgsz, self.enabled = hyp, imgsz, mode == "default"
        self.rng = np.random.default_rng(seed)
        self.geometric = A.Compose([self._affine()], bbox_params=A.BboxParams(**_BOXES), seed=seed)
        self.mosaic_geometric = A.Compose([self._affine(canvas=2), A.CenterCrop(imgsz, imgsz)],
                                          bbox_params=A.BboxParams(**_BOXES), seed=seed)
        self.photometric = A.Compose(self._extras(), seed=seed)  # pixels only: boxes stay where they are
        self.flips = A.Compose([A.VerticalFlip(p=hyp["flipud"]), A.HorizontalFlip(p=hyp["fliplr"]),
                                A.RandomRotate90(p=hyp["rotate90"])], bbox_params=A.BboxParams(**_BOXES), seed=seed)

    def reseed(self, seed: int) -> None:
        """A fresh random stream (each DataLoader worker calls this with its own seed)."""
        self.rng = np.random.default_rng(seed)
        for k, compose in enumerate((self.geometric, self.mosaic_geometric, self.photometric, self.flips)):
            compose.set_random_seed(seed + k)

    def _affine(self, canvas: int = 1) -> A.BasicTransform:
        h = self.hyp
        # translate is a fraction of the output size; on the 2× mosaic canvas that is half as much
        transforms = [A.Affine(scale=(1 - h["scale"], 1 + h["scale"]), translate_percent=(-h["translate"] / canvas,
                               h["translate"] / canvas), rotate=(-h["degrees"], h["degrees"]),
                               shear=(-h["shear"], h["shear"]), border_mode=cv2.BORDER_CONSTANT, fill=PAD_COLOR, p=1.0)]
        if h["perspective"] > 0:
            transforms.insert(0, A.Perspective(scale=(0, h["perspective"] * 100), fill=PAD_COLOR, p=1.0))
        return A.Sequential(transforms, p=1.0)

    def _extras(self) -> list[A.BasicTransform]:
        h = self.hyp
        candidates = [(A.Blur, "blur", {"blur_limit": (3, 7)}), (A.MedianBlur, "median_blur", {"blur_limit": (3, 7)}),
                      (A.ToGray, "gray", {}), (A.CLAHE, "clahe", {"clip_limit": (1, 4)}),
                      (A.RandomBrightnessContrast, "brightness_contrast", {}), (A.RandomGamma, "gamma", {}),
                      (A.ImageCompression, "jpeg", {"quality_range": (75, 100)}), (A.ColorJitter, "color_jitter", {})]
        return [cls(p=h[key], **kwargs) for cls, key, kwargs in candidates if h[key] > 0]

    def __call__(self, index: int, count: int, load: Callable[[int], Sample]) -> Sample:
        """An augmented ``imgsz``² sample built around ``index`` (mosaic draws 3 more of ``count``)."""
        if not self.enabled:
            return letterbox_sample(*load(index), self.imgsz)
        if self.rng.random() < self.hyp["mosaic"]:
            others = self.rng.integers(0, count, 3)
            image, boxes, classes = mosaic([load(index)] + [load(int(i)) for i in others], self.imgsz, self.rng)
            image, boxes, classes = self._apply(self.mosaic_geometric, image, boxes, classes)
        else:
            image, boxes, classes = letterbox_sample(*load(index), self.imgsz)
            image, boxes, classes = self._apply(self.geometric, image, boxes, classes)
        if self.photometric.transforms:
            image = self.photometric(image=image)["image"]
        image = hsv_jitter(image, (self.hyp["hsv_h"], self.hyp["hsv_s"], self.hyp["hsv_v"]), self.rng)
        return self._apply(self.flips, image, boxes, classes)

    @staticmethod
    def _apply(compose: A.Compose, image, boxes, classes) -> Sample:
        if not compose.transforms:
            return image, boxes, classes
        h, w = image.shape[:2]
        boxes = boxes.reshape(-1, 4).clip(0, [w, h, w, h])
        out = compose(image=image, bboxes=boxes, classes=classes)
        return out["image"], np.asarray(out["bboxes"], np.float64).reshape(-1, 4), np.asarray(out["classes"], np.int64)
