"""Evaluation: the reference bundle reproduces upstream's COCO mAP; every dataset layout reads the same."""

from __future__ import annotations

import json
import shutil

import pytest

import edgeyolo
from edgeyolo.datasets import load_dataset
from edgeyolo.evaluate import evaluate


@pytest.fixture(scope="module")
def detector(cpu_fp32_bundle):
    return edgeyolo.load(cpu_fp32_bundle)


def test_cpu_fp32_matches_upstream_map_on_coco_val_500(detector, coco_val, expected_dir):
    upstream = json.loads((expected_dir / "val_yolov5n_upstream.json").read_text())
    result = evaluate(detector, load_dataset(coco_val))
    assert result.images == upstream["images"] == 500
    assert result.boxes == upstream["boxes"]
    assert abs(result.map50_95 - upstream["coco_metric"]["map50_95"]) * 100 <= 0.3
    assert abs(result.map50 - upstream["coco_metric"]["map50"]) * 100 <= 0.3


@pytest.fixture(scope="module")
def small_yolo(coco_val, tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image in sorted((coco_val / "images").glob("*.jpg"))[:12]:
        shutil.copy(image, root / "images")
        shutil.copy(coco_val / "labels" / f"{image.stem}.txt", root / "labels")
    return root


def test_yaml_and_coco_json_layouts_score_like_the_folder(detector, small_yolo):
    import cv2

    base = evaluate(detector, load_dataset(small_yolo), per_class=True)
    assert base.images == 12 and base.map50_95 > 0.1
    assert "person" in base.per_class

    yaml_file = small_yolo / "data.yaml"
    yaml_file.write_text(f"path: {small_yolo}\nval: images\nnames:\n  0: person\n")
    via_yaml = evaluate(detector, load_dataset(yaml_file))
    assert via_yaml.map50_95 == pytest.approx(base.map50_95)

    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(80)]}
    for i, image in enumerate(sorted((small_yolo / "images").glob("*.jpg"))):
        h, w = cv2.imread(str(image)).shape[:2]
        coco["images"].append({"id": i, "file_name": image.name, "width": w, "height": h})
        for line in (small_yolo / "labels" / f"{image.stem}.txt").read_text().splitlines():
            c, cx, cy, bw, bh = line.split()
            cx, cy, bw, bh = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": int(c) + 1,
                                        "bbox": [cx - bw / 2, cy - bh / 2, bw, bh], "iscrowd": 0, "area": bw * bh})
    json_file = small_yolo / "instances_val.json"
    json_file.write_text(json.dumps(coco))
    via_json = evaluate(detector, load_dataset(json_file))
    assert via_json.boxes == base.boxes
    assert via_json.map50_95 == pytest.approx(base.map50_95, abs=1e-6)
