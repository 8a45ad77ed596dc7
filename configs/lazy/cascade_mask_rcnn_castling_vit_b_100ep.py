# Castling-ViT-B Cascade Mask R-CNN: the Mask R-CNN recipe with three box stages
# (IoU 0.5, 0.6, 0.7), each a 4conv1fc head with LN and class-agnostic box regression.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .mask_rcnn_castling_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

for single_stage_key in ("box_head", "box_predictor", "proposal_matcher"):
    model.roi_heads.pop(single_stage_key)
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w_xy, w_xy, w_wh, w_wh)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for w_xy, w_wh in ((10, 5), (20, 10), (30, 15))
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
        for iou in (0.5, 0.6, 0.7)
    ],
)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
