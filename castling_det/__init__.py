"""castling_det: Castling-ViT (linear-angular attention) backbones for Detectron2.

``import castling_det`` registers the backbones ``build_castling_vit_backbone``,
``build_castling_vit_fpn_backbone`` and ``build_retinanet_castling_vit_fpn_backbone``.
"""
from .detectron2_check import check_detectron2

check_detectron2()  # before anything imports Detectron2's newer parts: a clear error if too old

from . import modeling  # noqa: E402,F401  (registers the backbones)
from .config import add_castling_config, load_castling_config  # noqa: E402
from .modeling import (  # noqa: E402
    CastlingFPN,
    CastlingViT,
    LinearAngularAttention,
    SoftmaxAttention,
    any_branch_active,
    build_castling_vit_backbone,
    build_castling_vit_fpn_backbone,
    build_retinanet_castling_vit_fpn_backbone,
    set_branch_scale,
    set_softmax_branch,
    softmax_branch,
)

__version__ = "0.1.0"

__all__ = [
    "CastlingFPN",
    "CastlingViT",
    "LinearAngularAttention",
    "SoftmaxAttention",
    "add_castling_config",
    "load_castling_config",
    "any_branch_active",
    "build_castling_vit_backbone",
    "build_castling_vit_fpn_backbone",
    "build_retinanet_castling_vit_fpn_backbone",
    "set_branch_scale",
    "set_softmax_branch",
    "softmax_branch",
]
