"""Data sets made or registered by castling_det."""
from .register import register_coco_dataset, register_voc_dataset
from .shapes import SHAPE_CATEGORIES, make_shapes_dataset

__all__ = ["SHAPE_CATEGORIES", "make_shapes_dataset", "register_coco_dataset", "register_voc_dataset"]
