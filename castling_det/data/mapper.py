"""A DatasetMapper whose images come through :func:`read_record_image`."""
import copy
from typing import Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import read_record_image

__all__ = ["CheckedDatasetMapper"]


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's :class:`DatasetMapper` for detection and instance segmentation, reading each
    image with :func:`read_record_image`: grey, alpha and 16-bit images arrive as 8-bit 3-channel
    ``image_format`` pixels, and an unreadable file stops with an error naming it and its record.

    ``dataset_names`` (the names its records may come from) only go into those errors. Semantic
    segmentation files are not read, and precomputed proposals are not supported.
    """

    @configurable
    def __init__(self, is_train: bool, *, dataset_names: Sequence[str] = (), **kwargs):
        super().__init__(is_train, **kwargs)
        if self.proposal_topk is not None:
            raise ValueError("CheckedDatasetMapper does not support precomputed proposals")
        self.dataset_names = tuple(dataset_names)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Sequence[str] = ()):
        return {**super().from_config(cfg, is_train), "dataset_names": dataset_names}

    def __call__(self, dataset_dict):
        """The model's input for one record: ``"image"`` (CHW uint8 tensor, augmented) and, in
        training, ``"instances"``."""
        record = copy.deepcopy(dataset_dict)  # the loader's records are reused every epoch
        image = read_record_image(record, self.image_format, self.dataset_names)
        utils.check_image_size(record, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            record.pop("annotations", None)
        elif "annotations" in record:
            self._transform_annotations(record, transforms, image.shape[:2])
        return record
