"""Data sets made or registered by castling_det, and the checks on their boxes and images."""
from .boxes import clean_boxes
from .images import ImageReadError, read_image, read_record_image
from .mapper import CheckedDatasetMapper
from .register import register_coco_dataset, register_voc_dataset
from .shapes import SHAPE_CATEGORIES, make_shapes_dataset
from .train_loader import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "SHAPE_CATEGORIES",
    "CheckedDatasetMapper",
    "ImageReadError",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "clean_boxes",
    "make_shapes_dataset",
    "read_image",
    "read_record_image",
    "register_coco_dataset",
    "register_voc_dataset",
]
