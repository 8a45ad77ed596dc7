"""Registering a user's own data sets (COCO json or Pascal VOC) by path, with the paths checked.

The data sets load through Detectron2's own loaders, lazily (on ``DatasetCatalog.get``), wrapped so
that a broken annotation file is named in the error, and with their boxes checked by
:func:`clean_boxes` (each kind of fix logged once per data set as a counted warning).
"""
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_voc_instances

from .boxes import clean_boxes

__all__ = ["register_coco_dataset", "register_voc_dataset"]

logger = logging.getLogger(__name__)


def _checked_loader(name: str, load: Callable[[], List[Dict]], min_size: float) -> Callable[[], List[Dict]]:
    """``load`` followed by :func:`clean_boxes`; each of its reports is logged the first time only,
    as the catalogue is read again for every evaluation."""
    reported = set()

    def load_checked():
        records = load()
        for message in clean_boxes(records, name, min_size):
            if message not in reported:
                reported.add(message)
                logger.warning(message)
        return records

    return load_checked


def _load_coco(name: str, json_file: str, image_root: str) -> List[Dict]:
    """Detectron2's ``load_coco_json``; a file that is not JSON is named in a ``ValueError``."""
    try:
        return load_coco_json(json_file, image_root, dataset_name=name)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"data set {name!r}: annotation file {json_file} is not valid JSON: {err}") from None


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format instances file under ``name`` (Detectron2's loader, lazily)."""
    for what, path in (("annotation file", json_file), ("image directory", image_root)):
        if not Path(path).exists():
            raise FileNotFoundError(f"data set {name!r}: {what} {path} does not exist")
    DatasetCatalog.register(name, _checked_loader(name, lambda: _load_coco(name, json_file, image_root), 0.0))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _first_bad_voc_annotation(
    name: str, voc_root: str, split: str, class_names: Sequence[str]
) -> Optional[Exception]:
    """The error for the first annotation file of the split that is missing, is not XML or names
    a class not in ``class_names``; ``None`` when all are fine."""
    split_file = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    for record_id in split_file.read_text().split():
        xml_file = Path(voc_root) / "Annotations" / f"{record_id}.xml"
        where = f"data set {name!r}: annotation file {xml_file} (record {record_id!r})"
        if not xml_file.is_file():
            return FileNotFoundError(f"{where} does not exist")
        try:
            tree = ET.parse(xml_file)
        except ET.ParseError as err:
            return ValueError(f"{where} is not valid XML: {err}")
        unknown = sorted({obj.findtext("name") for obj in tree.iter("object")} - set(class_names), key=str)
        if unknown:
            return ValueError(f"{where} names classes {unknown} not in the given {list(class_names)}")
    return None


def _load_voc(name: str, voc_root: str, split: str, class_names: Sequence[str]) -> List[Dict]:
    """Detectron2's ``load_voc_instances``; when it fails, the failing file is looked for (only then,
    as Detectron2's error does not say which of the split's files it was) and named."""
    try:
        return load_voc_instances(voc_root, split, class_names)
    except (ET.ParseError, OSError, ValueError):
        named = _first_bad_voc_annotation(name, voc_root, split, class_names)
        if named is None:
            raise
        raise named from None


def register_voc_dataset(name: str, voc_root: str, split: str, class_names: Sequence[str]) -> None:
    """Register the ``split`` of a Pascal VOC layout (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/{split}.txt``) with the given class names under ``name``."""
    split_file = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"data set {name!r}: split file {split_file} does not exist")
    class_names = [c for c in class_names if c]
    if not class_names:
        raise ValueError(f"data set {name!r}: no class names given")
    # Detectron2 turns VOC's 1-based inclusive corners into a box 1 pixel wider and taller: a box
    # of zero width or height in the file has width or height 1 once loaded.
    loader = _checked_loader(name, lambda: _load_voc(name, voc_root, split, class_names), 1.0)
    DatasetCatalog.register(name, loader)
    # Only Detectron2's PascalVOCDetectionEvaluator reads the year (2007: 11-point AP).
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names), dirname=voc_root, year=2012, split=split
    )
