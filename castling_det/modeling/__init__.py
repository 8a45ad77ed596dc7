"""Castling-ViT modules; importing this registers the backbones with Detectron2."""
from .attention import LinearAngularAttention, SoftmaxAttention, masked_softmax_attention
from .backbone import ATTN_KINDS, VIT_PRESETS, Block, CastlingViT
from .branch import (
    any_branch_active,
    branch_modules,
    set_branch_scale,
    set_softmax_branch,
    softmax_branch,
)
from .fpn import (
    CastlingFPN,
    build_castling_vit_backbone,
    build_castling_vit_fpn_backbone,
    build_retinanet_castling_vit_fpn_backbone,
)

__all__ = [
    "ATTN_KINDS",
    "VIT_PRESETS",
    "Block",
    "CastlingFPN",
    "CastlingViT",
    "LinearAngularAttention",
    "SoftmaxAttention",
    "build_castling_vit_backbone",
    "build_castling_vit_fpn_backbone",
    "any_branch_active",
    "branch_modules",
    "build_retinanet_castling_vit_fpn_backbone",
    "masked_softmax_attention",
    "set_branch_scale",
    "set_softmax_branch",
    "softmax_branch",
]
