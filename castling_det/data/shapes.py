"""A synthetic COCO-format instance-segmentation data set of coloured shapes.

Each image holds a few non-overlapping circles, squares and triangles of random colour, size and
place on a noisy background; every object has a box and an exact polygon mask. It is what the main
job trains on: small enough for a CPU, hard enough that AP above zero means the detector learned.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np

__all__ = ["SHAPE_CATEGORIES", "make_shapes_dataset"]

SHAPE_CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "square"},
    {"id": 3, "name": "triangle"},
]
_CIRCLE_VERTICES = 32


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape inscribed in the circle (cx, cy, radius), rotated by angle."""
    count = {"circle": _CIRCLE_VERTICES, "square": 4, "triangle": 3}[kind]
    theta = angle + np.arange(count) * 2 * math.pi / count
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)


def _overlaps(box: Tuple[float, float, float, float], boxes: List[Tuple[float, ...]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _make_image(rng: np.random.Generator, size: int, max_objects: int):
    """One image (H, W, 3 uint8, BGR) and its objects as (category_id, polygon) pairs."""
    background = rng.integers(0, 90, size=3)
    image = np.clip(background + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # rejection sampling of a free spot
            category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
            radius = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(radius, size - radius, size=2)
            polygon = _shape_polygon(category["name"], cx, cy, radius, rng.uniform(0, 2 * math.pi))
            box = (*polygon.min(axis=0), *polygon.max(axis=0))
            if not _overlaps(box, boxes, gap=2.0):
                break
        else:
            continue
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        cv2.fillPoly(image, [np.round(polygon).astype(np.int32)], colour, lineType=cv2.LINE_AA)
        boxes.append(box)
        objects.append((category["id"], polygon))
    return image, objects


def _annotation(ann_id: int, image_id: int, category_id: int, polygon: np.ndarray) -> Dict:
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    xs, ys = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))  # shoelace
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": area,
        "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
        "iscrowd": 0,
    }


def make_shapes_dataset(
    output_dir, *, num_train: int = 300, num_val: int = 60, image_size: int = 192,
    max_objects: int = 4, seed: int = 0,
) -> Dict[str, Tuple[Path, Path]]:
    """Write the data set in COCO layout under ``output_dir``.

    Layout: ``annotations/{split}.json`` and ``{split}/*.png`` for the splits ``train`` and
    ``val``. The same arguments give the same files.

    Returns:
        ``{split: (json_path, image_dir)}``, ready for ``register_coco_instances``.
    """
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    (output_dir / "annotations").mkdir(parents=True, exist_ok=True)
    splits = {}
    ann_id = 1
    for split, count in (("train", num_train), ("val", num_val)):
        image_dir = output_dir / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, objects = _make_image(rng, image_size, max_objects)
            file_name = f"{image_id:06d}.png"
            cv2.imwrite(str(image_dir / file_name), image)
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            for category_id, polygon in objects:
                annotations.append(_annotation(ann_id, image_id, category_id, polygon))
                ann_id += 1
        json_path = output_dir / "annotations" / f"{split}.json"
        coco = {"images": images, "annotations": annotations, "categories": SHAPE_CATEGORIES}
        json_path.write_text(json.dumps(coco))
        splits[split] = (json_path, image_dir)
    return splits
