"""Registering a user's own data sets (COCO json or Pascal VOC) by path, with the paths checked."""
from pathlib import Path
from typing import Sequence

from detectron2.data.datasets import register_coco_instances, register_pascal_voc

__all__ = ["register_coco_dataset", "register_voc_dataset"]


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format instances file under ``name`` (Detectron2's loader, lazily)."""
    for what, path in (("annotation file", json_file), ("image directory", image_root)):
        if not Path(path).exists():
            raise FileNotFoundError(f"data set {name!r}: {what} {path} does not exist")
    register_coco_instances(name, {}, json_file, image_root)


def register_voc_dataset(name: str, voc_root: str, split: str, class_names: Sequence[str]) -> None:
    """Register the ``split`` of a Pascal VOC layout (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/{split}.txt``) with the given class names under ``name``."""
    split_file = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"data set {name!r}: split file {split_file} does not exist")
    class_names = [c for c in class_names if c]
    if not class_names:
        raise ValueError(f"data set {name!r}: no class names given")
    # Only Detectron2's PascalVOCDetectionEvaluator reads the year (2007: 11-point AP).
    register_pascal_voc(name, voc_root, split, year=2012, class_names=class_names)
