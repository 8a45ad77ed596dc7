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
        # The yacs configs' recipe (castling_det/config.py): the paper's 9x1 depthwise convolution
        # along the token sequence, and a softmax branch keeping the weights >= 1/N of each row
        # (alive from the first iteration). The paper's branch: branch_mask="absolute",
        # branch_threshold=0.02 and train.branch l1_weight=1.0.
        conv_kind="seq",
        conv_kernel_size=9,
        branch_mask="relative",
        branch_threshold=1.0,
        out_features=["last_feat"],
    ),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
)
