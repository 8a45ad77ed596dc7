"""Checking the boxes of loaded data set records: clip to the image, drop the empty, count both.

Detectron2 clips and drops such boxes too, but silently and per image inside the mapper; doing it
once at load time lets every data set report how many of its boxes were changed or lost.
"""
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

from detectron2.structures import BoxMode

__all__ = ["clean_boxes"]

# Each kind of change, and how the report describes it.
DEGENERATE = "dropped {count} of {total} boxes of zero or negative width or height"
OUTSIDE = "dropped {count} of {total} boxes lying wholly outside their image"
CLIPPED = "clipped {count} of {total} boxes reaching outside their image to its borders"


def _check_box(box_xyxy, width: float, height: float, min_size: float):
    """``(kind, box)``: the kind of change (``None`` if none) and the box to keep (``None`` to drop)."""
    x0, y0, x1, y1 = box_xyxy
    # Written as "not (... > ...)" so that a NaN coordinate counts as degenerate too.
    if not (x1 - x0 > min_size and y1 - y0 > min_size):
        return DEGENERATE, None
    clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
               min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return OUTSIDE, None
    if clipped != [x0, y0, x1, y1]:
        return CLIPPED, clipped
    return None, box_xyxy


def clean_boxes(records: List[Dict], dataset_name: str, min_size: float = 0.0) -> List[str]:
    """Clip the boxes of ``records`` (Detectron2 dicts, changed in place) to their image and drop
    those of width or height ``<= min_size`` or left empty by the clipping.

    Records keep their place even when no box is left (Detectron2 drops empty images in training
    itself, with ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``). Returns one message per kind of change
    that happened, with its count and its first case, e.g. ``"data set 'x': dropped 3 of 120 boxes
    of zero or negative width or height (first: image 'a.jpg', object 4)"``.
    """
    counts: Counter = Counter()
    first: Dict[str, Tuple[str, int]] = {}
    total = 0
    for record in records:
        width, height = float(record["width"]), float(record["height"])
        kept = []
        for number, annotation in enumerate(record.get("annotations", []), start=1):
            total += 1
            mode = annotation["bbox_mode"]
            box = BoxMode.convert([float(v) for v in annotation["bbox"]], mode, BoxMode.XYXY_ABS)
            kind, new_box = _check_box(box, width, height, min_size)
            if kind is not None:
                counts[kind] += 1
                first.setdefault(kind, (Path(record["file_name"]).name, number))
            if new_box is not None:
                if kind is not None:  # clipped: write the box back in the record's own mode
                    annotation["bbox"] = BoxMode.convert(new_box, BoxMode.XYXY_ABS, mode)
                kept.append(annotation)
        if "annotations" in record:
            record["annotations"] = kept
    return [
        f"data set {dataset_name!r}: {kind.format(count=counts[kind], total=total)} "
        f"(first: image {first[kind][0]!r}, object {first[kind][1]})"
        for kind in (DEGENERATE, OUTSIDE, CLIPPED)
        if counts[kind]
    ]
