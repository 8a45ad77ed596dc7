# Mask R-CNN with a Castling-ViT-B backbone: Detectron2's own ViTDet Mask R-CNN
# (common/models/mask_rcnn_vitdet.py: LN in the heads, 2-conv RPN, 4conv1fc box head)
# with its backbone swapped for CastlingViT + CastlingFPN.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from castling_det import CastlingFPN, CastlingViT

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

model.backbone = L(CastlingFPN)(
    net=L(CastlingViT)(
        img_size=224,  # the pre-training size of ViT/MAE checkpoints; interpolated to any input
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        attn_kinds="castling",
        # Detection tokens form a grid: a 3x3 depthwise convolution over it.
        conv_kind="grid",
        conv_kernel_size=3,
        out_features=["last_feat"],
    ),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
)
