"""Drawing a detector's predictions on an image with Detectron2's ``Visualizer``."""
import logging

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["dataset_metadata", "draw_predictions"]

logger = logging.getLogger(__name__)


def dataset_metadata(cfg) -> Metadata:
    """The metadata (class names) of the config's first test set, else its first training set,
    when that data set is registered; empty metadata (classes drawn as numbers) otherwise."""
    names = (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN)
    if not names:
        return Metadata(name="__demo__")
    if names[0] not in DatasetCatalog.list():
        logger.info("Data set %r is not registered: classes are drawn as numbers", names[0])
        return Metadata(name="__demo__")
    if not MetadataCatalog.get(names[0]).get("thing_classes"):
        DatasetCatalog.get(names[0])  # a COCO-json data set learns its class names when first loaded
    return MetadataCatalog.get(names[0])


def draw_predictions(image_rgb: np.ndarray, predictions: dict, metadata: Metadata,
                     confidence_threshold: float) -> np.ndarray:
    """``image_rgb`` (HWC uint8) with the predicted instances whose score is at least
    ``confidence_threshold`` drawn on it: boxes, class names, scores and masks. Same size."""
    instances = predictions["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()
