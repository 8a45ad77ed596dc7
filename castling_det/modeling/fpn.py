"""The FPN adapter of Castling-ViT and the backbone builders registered with Detectron2.

The adapter is ViTDet's simple feature pyramid (Detectron2's :class:`SimpleFeaturePyramid`): the
single stride-16 map is upsampled by deconvolutions and downsampled by pooling into p2–p5 (plus
p6 by max-pooling) for the R-CNN family, or p3–p5 plus p6/p7 for RetinaNet.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

from .attention import BRANCH_MASKS
from .backbone import ATTN_KINDS, VIT_PRESETS, CastlingViT, vit_feature_names

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


def _check(ok: bool, key: str, value, requirement: str) -> None:
    """Raise a ValueError naming the config key when a value is not allowed."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: {requirement}")


def _vit_kwargs(cfg, in_chans: int) -> dict:
    """Keyword arguments of :class:`CastlingViT` from ``cfg.MODEL.CASTLING``.

    Every value is checked here, so that a bad one is reported by its config key at build time.
    """
    c = cfg.MODEL.CASTLING
    key = "MODEL.CASTLING."
    _check(c.SIZE in VIT_PRESETS, key + "SIZE", c.SIZE, f"one of {list(VIT_PRESETS)}")
    embed_dim, depth, num_heads = VIT_PRESETS[c.SIZE]
    for name in ("EMBED_DIM", "DEPTH", "NUM_HEADS"):
        _check(c[name] >= 0, key + name, c[name], "0 (the preset's value) or positive")
    embed_dim, depth, num_heads = c.EMBED_DIM or embed_dim, c.DEPTH or depth, c.NUM_HEADS or num_heads
    _check(
        embed_dim % num_heads == 0, key + "NUM_HEADS", num_heads, f"must divide the width {embed_dim}"
    )
    _check(c.PATCH_SIZE > 0, key + "PATCH_SIZE", c.PATCH_SIZE, "positive")
    _check(
        c.PRETRAIN_IMG_SIZE > 0 and c.PRETRAIN_IMG_SIZE % c.PATCH_SIZE == 0,
        key + "PRETRAIN_IMG_SIZE", c.PRETRAIN_IMG_SIZE, f"a multiple of PATCH_SIZE={c.PATCH_SIZE}",
    )
    kinds = list(c.ATTN_KINDS)
    _check(
        all(kind in ATTN_KINDS for kind in kinds), key + "ATTN_KINDS", kinds,
        f"entries must be among {list(ATTN_KINDS)}",
    )
    _check(
        len(kinds) in (1, depth), key + "ATTN_KINDS", kinds,
        f"needs 1 entry (every block) or one per block ({depth})",
    )
    _check(
        c.WINDOW_SIZE > 0 or "window" not in kinds, key + "WINDOW_SIZE", c.WINDOW_SIZE,
        "positive when a block uses window attention",
    )
    _check(c.MLP_RATIO > 0, key + "MLP_RATIO", c.MLP_RATIO, "positive")
    _check(0 <= c.DROP_PATH_RATE < 1, key + "DROP_PATH_RATE", c.DROP_PATH_RATE, "in [0, 1)")
    _check(c.CONV_KIND in ("seq", "grid"), key + "CONV_KIND", c.CONV_KIND, "'seq' or 'grid'")
    _check(
        c.CONV_KERNEL_SIZE > 0 and c.CONV_KERNEL_SIZE % 2 == 1, key + "CONV_KERNEL_SIZE",
        c.CONV_KERNEL_SIZE, "a positive odd number",
    )
    _check(
        c.BRANCH.MASK in BRANCH_MASKS, key + "BRANCH.MASK", c.BRANCH.MASK, f"one of {list(BRANCH_MASKS)}"
    )
    _check(c.BRANCH.THRESHOLD >= 0, key + "BRANCH.THRESHOLD", c.BRANCH.THRESHOLD, ">= 0")
    _check(
        c.BRANCH.RELATIVE_THRESHOLD >= 0, key + "BRANCH.RELATIVE_THRESHOLD",
        c.BRANCH.RELATIVE_THRESHOLD, ">= 0",
    )
    _check(c.BRANCH.TOPK > 0, key + "BRANCH.TOPK", c.BRANCH.TOPK, "positive")
    _check(
        c.BRANCH.CHUNK_SIZE >= 0, key + "BRANCH.CHUNK_SIZE", c.BRANCH.CHUNK_SIZE,
        "0 (no chunking) or positive",
    )
    out_features = list(c.OUT_FEATURES)
    _check(
        len(out_features) > 0 and set(out_features) <= set(vit_feature_names(depth)),
        key + "OUT_FEATURES", out_features,
        f"a non-empty list among 'last_feat', 'block0'..'block{depth - 1}'",
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
        conv_kind=c.CONV_KIND,
        conv_kernel_size=c.CONV_KERNEL_SIZE,
        learn_linear_weight=c.LEARN_LINEAR_WEIGHT,
        branch_mask=c.BRANCH.MASK,
        # The module has one threshold, read according to the mask.
        branch_threshold=(
            c.BRANCH.RELATIVE_THRESHOLD if c.BRANCH.MASK == "relative" else c.BRANCH.THRESHOLD
        ),
        branch_topk=c.BRANCH.TOPK,
        branch_as_sum=c.BRANCH.AS_SUM,
        branch_chunk_size=c.BRANCH.CHUNK_SIZE or None,
        softmax_branch=c.BRANCH.ENABLED,
        compile_tail=c.COMPILE_TAIL,
        fused=c.FUSED_DEPLOYED,
        cuda_graphs=c.CUDA_GRAPHS,
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        out_features=out_features,
    )


@BACKBONE_REGISTRY.register()
def build_castling_vit_backbone(cfg, input_shape: ShapeSpec) -> CastlingViT:
    """The bare Castling-ViT, configured by ``cfg.MODEL.CASTLING``, with the first
    ``MODEL.BACKBONE.FREEZE_AT`` stages frozen (see :meth:`CastlingViT.freeze`)."""
    return CastlingViT(**_vit_kwargs(cfg, input_shape.channels)).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


def _build_pyramid(cfg, input_shape: ShapeSpec, scale_factors, top_block) -> CastlingFPN:
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    depth = cfg.MODEL.CASTLING.DEPTH or VIT_PRESETS.get(cfg.MODEL.CASTLING.SIZE, (0, 0, 0))[1]
    _check(
        len(in_features) == 1 and in_features[0] in vit_feature_names(depth),
        "MODEL.FPN.IN_FEATURES", in_features,
        f"exactly one of 'last_feat', 'block0'..'block{depth - 1}'",
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
