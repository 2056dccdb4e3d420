"""Hand-built COCO annotation files for the detection tests."""

import json
from pathlib import Path

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def image(image_id: int, size: int = 200) -> dict:
    """A square COCO image entry."""
    return {"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.jpg"}


def box_annotation(annotation_id: int, image_id: int, category_id: int, box: list[float]) -> dict:
    """A COCO annotation for an [x, y, w, h] box, its segmentation the box's polygon."""
    x, y, w, h = box
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": box,
        "area": w * h,
        "iscrowd": 0,
        "segmentation": [polygon],
    }


def write_coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    """Writes an annotation file with the two categories."""
    path = tmp_path / "instances.json"
    dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    path.write_text(json.dumps(dataset))
    return path
