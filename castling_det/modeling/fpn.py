"""The FPN adapter of Castling-ViT and the backbone builders registered with Detectron2.

The adapter is ViTDet's simple feature pyramid (Detectron2's :class:`SimpleFeaturePyramid`): the
single stride-16 map is upsampled by deconvolutions and downsampled by pooling into p2–p5 (plus
p6 by max-pooling) for the R-CNN family, or p3–p5 plus p6/p7 for RetinaNet.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

from .backbone import ATTN_KINDS, VIT_PRESETS, CastlingViT

__all__ = [
    "CastlingFPN",
    "build_castling_vit_backbone",
    "build_castling_vit_fpn_backbone",
    "build_retinanet_castling_vit_fpn_backbone",
]


class CastlingFPN(SimpleFeaturePyramid):
    """:class:`SimpleFeaturePyramid` that tells the model how to pad its input.

    Upstream reports a ``size_divisibility`` of 0 and misspells the key of its padding constraints,
    so images of arbitrary size are not padded to a multiple of the coarsest stride and the pyramid
    levels lose their exact 2x relation. Both are reported correctly here, so no square padding is
    needed. Constructor arguments are :class:`SimpleFeaturePyramid`'s.
    """

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


def _choice(key: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    return value


def _vit_kwargs(cfg, in_chans: int) -> dict:
    """Keyword arguments of :class:`CastlingViT` from ``cfg.MODEL.CASTLING`` (validated)."""
    c = cfg.MODEL.CASTLING
    embed_dim, depth, num_heads = VIT_PRESETS[_choice("MODEL.CASTLING.SIZE", c.SIZE, VIT_PRESETS)]
    embed_dim = c.EMBED_DIM or embed_dim
    depth = c.DEPTH or depth
    num_heads = c.NUM_HEADS or num_heads
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"MODEL.CASTLING.NUM_HEADS={num_heads} must divide the width "
            f"MODEL.CASTLING.EMBED_DIM={embed_dim}"
        )
    kinds = list(c.ATTN_KINDS)
    for kind in kinds:
        _choice("MODEL.CASTLING.ATTN_KINDS entry", kind, ATTN_KINDS)
    if len(kinds) not in (1, depth):
        raise ValueError(
            f"MODEL.CASTLING.ATTN_KINDS has {len(kinds)} entries; it needs 1 (every block) "
            f"or one per block ({depth})"
        )
    if c.BRANCH_THRESHOLD < 0:
        raise ValueError(f"MODEL.CASTLING.BRANCH_THRESHOLD={c.BRANCH_THRESHOLD} must be >= 0")
    feature_names = ["last_feat"] + [f"block{i}" for i in range(depth)]
    for name in c.OUT_FEATURES:
        if name not in feature_names:
            raise ValueError(
                f"MODEL.CASTLING.OUT_FEATURES entry {name!r} is not one of 'last_feat', "
                f"'block0'..'block{depth - 1}'"
            )
    return dict(
        img_size=c.PRETRAIN_IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        attn_kinds=kinds[0] if len(kinds) == 1 else kinds,
        window_size=c.WINDOW_SIZE,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        conv_kind=_choice("MODEL.CASTLING.CONV_KIND", c.CONV_KIND, ("seq", "grid")),
        conv_kernel_size=c.CONV_KERNEL_SIZE,
        branch_threshold=c.BRANCH_THRESHOLD,
        branch_chunk_size=c.BRANCH_CHUNK_SIZE or None,
        softmax_branch=c.SOFTMAX_BRANCH,
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        out_features=list(c.OUT_FEATURES),
    )


@BACKBONE_REGISTRY.register()
def build_castling_vit_backbone(cfg, input_shape: ShapeSpec) -> CastlingViT:
    """The bare Castling-ViT, configured by ``cfg.MODEL.CASTLING``."""
    return CastlingViT(**_vit_kwargs(cfg, input_shape.channels))


def _build_pyramid(cfg, input_shape: ShapeSpec, scale_factors, top_block) -> CastlingFPN:
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if len(in_features) != 1:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={in_features} must name exactly one Castling-ViT feature"
        )
    vit_cfg = cfg.clone()
    vit_cfg.defrost()
    vit_cfg.MODEL.CASTLING.OUT_FEATURES = in_features
    return CastlingFPN(
        net=build_castling_vit_backbone(vit_cfg, input_shape),
        in_feature=in_features[0],
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=scale_factors,
        top_block=top_block,
        norm=cfg.MODEL.FPN.NORM,
    )


@BACKBONE_REGISTRY.register()
def build_castling_vit_fpn_backbone(cfg, input_shape: ShapeSpec) -> CastlingFPN:
    """Castling-ViT with a p2–p6 pyramid, for Faster/Mask/Cascade R-CNN."""
    return _build_pyramid(cfg, input_shape, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_castling_vit_fpn_backbone(cfg, input_shape: ShapeSpec) -> CastlingFPN:
    """Castling-ViT with a p3–p7 pyramid, for RetinaNet."""
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    return _build_pyramid(cfg, input_shape, (2.0, 1.0, 0.5), LastLevelP6P7(channels, channels, "p5"))
