"""Shared helpers of the castling_det test suite: tiny Detectron2 configs built in code."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

import castling_det

# Tiny Castling-ViT used throughout: 64 channels, 2 blocks, 2 heads of 32 channels.
TINY_EMBED_DIM = 64
TINY_DEPTH = 2
TINY_NUM_HEADS = 2
TINY_FPN_CHANNELS = 32
IMAGE_SIZES = [(120, 150), (100, 90)]  # (H, W) of detection_batch, both not multiples of 32


def tiny_castling_cfg(backbone_name: str = "build_castling_vit_backbone"):
    """A mutable Detectron2 config with ``MODEL.CASTLING`` set to a tiny, deterministic ViT."""
    cfg = get_cfg()
    castling_det.add_castling_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # Detectron2's default, 2, would freeze the embeddings and block 0
    c = cfg.MODEL.CASTLING
    c.EMBED_DIM = TINY_EMBED_DIM
    c.DEPTH = TINY_DEPTH
    c.NUM_HEADS = TINY_NUM_HEADS
    c.DROP_PATH_RATE = 0.0
    c.CONV_KERNEL_SIZE = 3
    c.BRANCH.CHUNK_SIZE = 16
    cfg.MODEL.FPN.IN_FEATURES = ["last_feat"]
    cfg.MODEL.FPN.OUT_CHANNELS = TINY_FPN_CHANNELS
    cfg.MODEL.FPN.NORM = "LN"
    return cfg


def tiny_detector_cfg(meta_arch: str, mask_on: bool = False):
    """Config of a tiny Faster/Mask R-CNN (``"GeneralizedRCNN"``) or RetinaNet on Castling-ViT."""
    if meta_arch == "GeneralizedRCNN":
        cfg = tiny_castling_cfg("build_castling_vit_fpn_backbone")
    elif meta_arch == "RetinaNet":
        cfg = tiny_castling_cfg("build_retinanet_castling_vit_fpn_backbone")
    else:
        raise ValueError(meta_arch)
    m = cfg.MODEL
    m.META_ARCHITECTURE = meta_arch
    m.MASK_ON = mask_on
    m.WEIGHTS = ""
    m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]

    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.BATCH_SIZE_PER_IMAGE = 32
    m.RPN.PRE_NMS_TOPK_TRAIN = 200
    m.RPN.POST_NMS_TOPK_TRAIN = 50
    m.RPN.PRE_NMS_TOPK_TEST = 100
    m.RPN.POST_NMS_TOPK_TEST = 20

    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_HEADS.NUM_CLASSES = 3
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    m.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.FC_DIM = 64
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    m.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    m.ROI_MASK_HEAD.NUM_CONV = 2
    m.ROI_MASK_HEAD.CONV_DIM = 32
    m.ROI_MASK_HEAD.POOLER_RESOLUTION = 14

    m.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    m.RETINANET.NUM_CLASSES = 3
    m.RETINANET.NUM_CONVS = 1
    m.RETINANET.SCORE_THRESH_TEST = 0.0
    m.RETINANET.TOPK_CANDIDATES_TEST = 100
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_castling_cfg():
    """Factory fixture: ``make_castling_cfg(backbone_name)`` -> tiny backbone config."""
    return tiny_castling_cfg


@pytest.fixture
def make_detector_cfg():
    """Factory fixture: ``make_detector_cfg(meta_arch, mask_on=False)`` -> tiny detector config."""
    return tiny_detector_cfg


def _box_polygon(x0, y0, x1, y1):
    """A polygon (list of one flat xy array) filling a diamond inside the box."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [np.array([cx, y0, x1, cy, cx, y1, x0, cy], dtype=np.float64)]


def detection_batch(mask_kind=None):
    """Two images with two and three ground-truth boxes, as a Detectron2 data loader gives them."""
    gt = [
        ([[10.0, 12.0, 70.0, 80.0], [60.0, 30.0, 140.0, 110.0]], [0, 2]),
        ([[5.0, 8.0, 50.0, 60.0], [30.0, 40.0, 85.0, 95.0], [20.0, 10.0, 45.0, 30.0]], [1, 0, 2]),
    ]
    inputs = []
    for index, ((height, width), (boxes, classes)) in enumerate(zip(IMAGE_SIZES, gt)):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if mask_kind == "polygon":
            instances.gt_masks = PolygonMasks([_box_polygon(*box) for box in boxes])
        elif mask_kind == "bitmask":
            masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in enumerate(boxes):
                masks[m, int(y0) : int(y1), int(x0) : int(x1)] = True
            instances.gt_masks = BitMasks(masks)
        inputs.append(
            {"image": image, "instances": instances, "height": height, "width": width,
             "image_id": index}
        )
    return inputs


class _OutputSizeRecorder(TorchDispatchMode):
    """Records the largest tensor produced by any ATen op run under it."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_shape = None
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.num_ops += 1
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.max_numel:
                self.max_numel = leaf.numel()
                self.max_shape = tuple(leaf.shape)
        return result


def largest_output(function, x):
    """(numel, shape) of the largest tensor any op makes in ``function(x)`` (a module, a
    predictor, ...) without gradients; the tensors it returns must be finite."""
    recorder = _OutputSizeRecorder()
    with torch.no_grad(), recorder:
        out = function(x)
    assert recorder.num_ops > 10  # the mode really saw the forward
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            assert torch.isfinite(leaf).all()
    return recorder.max_numel, recorder.max_shape
