# COCO data with large-scale jitter (ViTDet's recipe), on Detectron2's own common/data/coco.py.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from castling_det.data import CheckedDatasetMapper

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# Detectron2's mapper, but grey, alpha and 16-bit images arrive as 8-bit RGB, and an unreadable
# image stops with an error naming its file.
dataloader.train.mapper._target_ = CheckedDatasetMapper
dataloader.test.mapper._target_ = CheckedDatasetMapper

image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    # Scale the image by 0.1x-2x of the 1024 target, then crop 1024x1024 from it.
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    # No padding here: the Castling FPN adapter asks the model to pad each batch to a multiple of 32.
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = True
# Cropping cuts objects: recompute their boxes from the cropped masks.
dataloader.train.mapper.recompute_boxes = True
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
dataloader.test.mapper.image_format = "RGB"
