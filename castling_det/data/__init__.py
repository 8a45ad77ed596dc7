"""Data sets made or registered by castling_det."""
from .shapes import SHAPE_CATEGORIES, make_shapes_dataset

__all__ = ["SHAPE_CATEGORIES", "make_shapes_dataset"]
