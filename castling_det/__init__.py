"""castling_det: Castling-ViT (linear-angular attention) backbones for Detectron2.

``import castling_det`` registers the backbones ``build_castling_vit_backbone``,
``build_castling_vit_fpn_backbone`` and ``build_retinanet_castling_vit_fpn_backbone``.
"""
from . import modeling  # noqa: F401  (registers the backbones)
from .config import add_castling_config, load_castling_config
from .modeling import (
    CastlingFPN,
    CastlingViT,
    LinearAngularAttention,
    SoftmaxAttention,
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
    "build_castling_vit_backbone",
    "build_castling_vit_fpn_backbone",
    "build_retinanet_castling_vit_fpn_backbone",
    "set_branch_scale",
    "set_softmax_branch",
    "softmax_branch",
]
