"""Tests of the registered Castling-ViT backbones, built through Detectron2's config system."""
import math
import re

import pytest
import torch
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.modeling.backbone.utils import PatchEmbed as D2PatchEmbed
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.structures import ImageList

import castling_det
from castling_det import LinearAngularAttention, SoftmaxAttention
from castling_det.modeling.patch_embed import PatchEmbed

EMBED_DIM = 64
FPN_CHANNELS = 32


def _build(cfg):
    return build_backbone(cfg).eval()


# --------------------------------------------------------------------------------------------
# Registration, names, channels, strides, sizes
# --------------------------------------------------------------------------------------------
def test_backbones_are_registered():
    for name in (
        "build_castling_vit_backbone",
        "build_castling_vit_fpn_backbone",
        "build_retinanet_castling_vit_fpn_backbone",
    ):
        assert BACKBONE_REGISTRY.get(name) is getattr(castling_det, name)


def test_patch_embed_matmul_equals_detectron2s_convolution_values_and_gradients():
    torch.manual_seed(0)
    ours = PatchEmbed(patch_size=16, in_chans=3, embed_dim=EMBED_DIM)
    reference = D2PatchEmbed(kernel_size=(16, 16), stride=(16, 16), in_chans=3, embed_dim=EMBED_DIM)
    reference.load_state_dict(ours.state_dict())  # the same keys: checkpoints load either way
    # 100 x 130 pixels: the conv drops the last 4 rows and 2 columns, and so must the matmul.
    x = torch.randn(2, 3, 100, 130, requires_grad=True)
    out, expected = ours(x), reference(x)
    assert out.shape == (2, 6, 8, EMBED_DIM) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [x, ours.proj.weight, ours.proj.bias], grad)
    reference_grads = torch.autograd.grad(expected, [x, reference.proj.weight, reference.proj.bias], grad)
    for got, want in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ours_grads[0][..., 96:, :].abs().sum() == 0  # the cropped rows get no gradient


def test_bare_vit_shapes_on_non_multiple_input(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    backbone = _build(cfg)
    assert isinstance(backbone, castling_det.CastlingViT)
    shapes = backbone.output_shape()
    assert list(shapes) == ["last_feat"]
    assert shapes["last_feat"].channels == EMBED_DIM
    assert shapes["last_feat"].stride == 16

    x = torch.randn(2, 3, 100, 130)
    with torch.no_grad():
        out = backbone(x)
    assert list(out) == ["last_feat"]
    assert out["last_feat"].shape == (2, EMBED_DIM, 100 // 16, 130 // 16)  # (2, 64, 6, 8)
    assert torch.isfinite(out["last_feat"]).all()


def test_bare_vit_rejects_input_smaller_than_a_patch(make_castling_cfg):
    backbone = _build(make_castling_cfg("build_castling_vit_backbone"))
    with pytest.raises(ValueError, match=r"input of size \(15, 64\) is smaller than one 16-pixel patch"):
        backbone(torch.randn(1, 3, 15, 64))


# (backbone name, expected pyramid levels)
PYRAMIDS = [
    ("build_castling_vit_fpn_backbone", ["p2", "p3", "p4", "p5", "p6"]),
    ("build_retinanet_castling_vit_fpn_backbone", ["p3", "p4", "p5", "p6", "p7"]),
]


@pytest.mark.parametrize("name,levels", PYRAMIDS, ids=["rcnn_fpn", "retinanet_fpn"])
def test_pyramid_output_shape_and_padding_constraints(make_castling_cfg, name, levels):
    backbone = _build(make_castling_cfg(name))
    assert isinstance(backbone, castling_det.CastlingFPN)
    shapes = backbone.output_shape()
    assert list(shapes) == levels
    for level in levels:
        k = int(level[1:])
        assert shapes[level].channels == FPN_CHANNELS
        assert shapes[level].stride == 2**k

    assert backbone.size_divisibility == 32
    constraints = backbone.padding_constraints
    assert "size_divisibility" in constraints
    assert constraints["size_divisibility"] == 32
    assert constraints.get("square_size", 0) == 0


def _expected_level_size(size: int, k: int) -> int:
    """Side of level p_k of a pyramid fed ``size`` pixels, size a multiple of 32."""
    assert size % 32 == 0
    if k <= 5:
        return size // 2**k
    # p6 (and p7) halve the previous level, rounding up (stride-2 max-pool / 3x3 conv, pad 1)
    return math.ceil(_expected_level_size(size, k - 1) / 2)


@pytest.mark.parametrize("name,levels", PYRAMIDS, ids=["rcnn_fpn", "retinanet_fpn"])
def test_pyramid_sizes_after_imagelist_padding(make_castling_cfg, name, levels):
    backbone = _build(make_castling_cfg(name))
    images = [torch.randn(3, 100, 130), torch.randn(3, 90, 110)]
    batch = ImageList.from_tensors(
        images, backbone.size_divisibility, padding_constraints=backbone.padding_constraints
    )
    assert batch.tensor.shape == (2, 3, 128, 160)
    assert batch.image_sizes == [(100, 130), (90, 110)]

    with torch.no_grad():
        out = backbone(batch.tensor)
    assert list(out) == levels
    for level in levels:
        k = int(level[1:])
        expected = (2, FPN_CHANNELS, _expected_level_size(128, k), _expected_level_size(160, k))
        assert tuple(out[level].shape) == expected, level
        assert torch.isfinite(out[level]).all()
    # exact sizes of the stride-4..32 levels, written out
    exact = {"p2": (32, 40), "p3": (16, 20), "p4": (8, 10), "p5": (4, 5)}
    for level, hw in exact.items():
        if level in out:
            assert tuple(out[level].shape[-2:]) == hw
    assert tuple(out["p6"].shape[-2:]) == (2, 3)
    if "p7" in out:
        assert tuple(out["p7"].shape[-2:]) == (1, 2)


@pytest.mark.parametrize("name,levels", PYRAMIDS, ids=["rcnn_fpn", "retinanet_fpn"])
def test_pyramid_on_unpadded_input_follows_the_vit_grid(make_castling_cfg, name, levels):
    """Fed directly (no padding), the levels derive from the floor(H/16) x floor(W/16) grid."""
    backbone = _build(make_castling_cfg(name))
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 100, 130))
    grid_h, grid_w = 100 // 16, 130 // 16  # 6, 8
    expected = {
        "p2": (grid_h * 4, grid_w * 4),
        "p3": (grid_h * 2, grid_w * 2),
        "p4": (grid_h, grid_w),
        "p5": (grid_h // 2, grid_w // 2),
    }
    expected["p6"] = tuple(math.ceil(s / 2) for s in expected["p5"])
    expected["p7"] = tuple(math.ceil(s / 2) for s in expected["p6"])
    for level in levels:
        assert tuple(out[level].shape) == (2, FPN_CHANNELS) + expected[level], level


def test_fpn_reads_the_feature_named_in_fpn_in_features(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_fpn_backbone")
    cfg.MODEL.FPN.IN_FEATURES = ["block0"]
    backbone = _build(cfg)
    assert backbone.in_feature == "block0"
    assert backbone.net.output_shape().keys() == {"block0"}
    with torch.no_grad():
        feats = backbone.net(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["block0"]

    cfg.MODEL.FPN.IN_FEATURES = ["last_feat", "block0"]
    with pytest.raises(ValueError, match=re.escape("MODEL.FPN.IN_FEATURES")):
        build_backbone(cfg)


# --------------------------------------------------------------------------------------------
# Attention kinds per block
# --------------------------------------------------------------------------------------------
def test_per_block_attention_kinds_build_and_run(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.DEPTH = 4
    cfg.MODEL.CASTLING.ATTN_KINDS = ["castling", "softmax", "window", "castling"]
    cfg.MODEL.CASTLING.WINDOW_SIZE = 4  # does not divide the 6 x 8 token grid
    backbone = _build(cfg)

    blocks = backbone.blocks
    assert len(blocks) == 4
    assert [b.attn_kind for b in blocks] == ["castling", "softmax", "window", "castling"]
    assert isinstance(blocks[0].attn, LinearAngularAttention)
    assert isinstance(blocks[1].attn, SoftmaxAttention)
    assert isinstance(blocks[2].attn, SoftmaxAttention)
    assert isinstance(blocks[3].attn, LinearAngularAttention)
    assert [b.window_size for b in blocks] == [0, 0, 4, 0]

    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 100, 130))["last_feat"]
    assert out.shape == (2, EMBED_DIM, 6, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("window_size", [3, 5, 7])
def test_window_attention_with_window_not_dividing_grid(make_castling_cfg, window_size):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["window"]
    cfg.MODEL.CASTLING.WINDOW_SIZE = window_size
    backbone = _build(cfg)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 100, 130))["last_feat"]  # 6 x 8 tokens
    assert out.shape == (1, EMBED_DIM, 6, 8)
    assert torch.isfinite(out).all()


def test_window_attention_is_local_and_global_when_window_covers_grid(make_castling_cfg):
    """Same weights: windows covering the whole grid equal global softmax; smaller ones do not."""
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["softmax"]
    global_model = _build(cfg)
    cfg.MODEL.CASTLING.ATTN_KINDS = ["window"]
    cfg.MODEL.CASTLING.WINDOW_SIZE = 8
    full_window = _build(cfg)
    cfg.MODEL.CASTLING.WINDOW_SIZE = 4
    small_window = _build(cfg)
    full_window.load_state_dict(global_model.state_dict())
    small_window.load_state_dict(global_model.state_dict())

    x = torch.randn(1, 3, 128, 128)  # 8 x 8 tokens
    with torch.no_grad():
        ref = global_model(x)["last_feat"]
        full = full_window(x)["last_feat"]
        small = small_window(x)["last_feat"]
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    assert (small - ref).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------
# Output features
# --------------------------------------------------------------------------------------------
def test_block0_and_last_feat_together(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.OUT_FEATURES = ["block0", "last_feat"]
    backbone = _build(cfg)
    shapes = backbone.output_shape()
    assert set(shapes) == {"block0", "last_feat"}
    for name in ("block0", "last_feat"):
        assert shapes[name].channels == EMBED_DIM
        assert shapes[name].stride == 16

    x = torch.randn(2, 3, 100, 130)
    with torch.no_grad():
        out = backbone(x)
        # block0 is the output of the first block, recomputed by hand
        tokens = backbone.patch_embed(x)
        tokens = tokens + get_abs_pos(backbone.pos_embed, True, tokens.shape[1:3])
        after0 = backbone.blocks[0](tokens)
        after1 = backbone.blocks[1](after0)
    assert set(out) == {"block0", "last_feat"}
    assert out["block0"].shape == out["last_feat"].shape == (2, EMBED_DIM, 6, 8)
    torch.testing.assert_close(out["block0"], after0.permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["last_feat"], after1.permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    assert (out["block0"] - out["last_feat"]).abs().max().item() > 1e-3


def test_only_block0_requested(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.OUT_FEATURES = ["block0"]
    backbone = _build(cfg)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 80))
    assert list(out) == ["block0"]
    assert out["block0"].shape == (1, EMBED_DIM, 4, 5)


# --------------------------------------------------------------------------------------------
# Switching the softmax branch
# --------------------------------------------------------------------------------------------
def _branch_states(model):
    """Whether each castling block runs its branch in eval mode."""
    return [
        m.softmax_branch and m.branch_at_inference
        for m in model.modules()
        if isinstance(m, LinearAngularAttention)
    ]


def test_set_softmax_branch_changes_and_restores_output(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.DEPTH = 3
    cfg.MODEL.CASTLING.ATTN_KINDS = ["castling", "softmax", "castling"]
    backbone = _build(cfg)
    # sharpen the attention so the masked branch keeps a real share of the weights
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, LinearAngularAttention):
                module.qkv.weight.normal_(0.0, 0.2)
    x = torch.randn(2, 3, 100, 130)

    assert _branch_states(backbone) == [False, False]  # as built, eval mode is deployed
    with torch.no_grad():
        built = backbone(x)["last_feat"]
        assert castling_det.set_softmax_branch(backbone, True) == 2
        assert _branch_states(backbone) == [True, True]
        on = backbone(x)["last_feat"]
        assert castling_det.set_softmax_branch(backbone, False) == 2
        assert _branch_states(backbone) == [False, False]
        off = backbone(x)["last_feat"]
        assert castling_det.set_softmax_branch(backbone, True) == 2
        assert _branch_states(backbone) == [True, True]
        on_again = backbone(x)["last_feat"]
    assert (on - off).abs().max().item() > 1e-3
    assert torch.equal(on, on_again)
    assert torch.equal(built, off)


def test_set_softmax_branch_on_fpn_and_plain_modules(make_castling_cfg):
    backbone = _build(make_castling_cfg("build_castling_vit_fpn_backbone"))
    assert castling_det.set_softmax_branch(backbone, False) == 2  # DEPTH castling blocks
    assert _branch_states(backbone) == [False, False]
    assert castling_det.set_softmax_branch(torch.nn.Linear(3, 3), False) == 0


def test_softmax_branch_context_manager_restores_per_module_state(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.DEPTH = 3
    backbone = _build(cfg)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, LinearAngularAttention):
                module.qkv.weight.normal_(0.0, 0.2)
    x = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        castling_det.set_softmax_branch(backbone, True)
        all_on = backbone(x)["last_feat"]
        castling_det.set_softmax_branch(backbone, False)
        all_off = backbone(x)["last_feat"]

        attns = [b.attn for b in backbone.blocks]
        attns[1].softmax_branch = attns[1].branch_at_inference = True
        mixed = backbone(x)["last_feat"]

        with castling_det.softmax_branch(backbone, True) as inside:
            assert inside is backbone
            assert _branch_states(backbone) == [True, True, True]
            assert torch.equal(backbone(x)["last_feat"], all_on)
        assert _branch_states(backbone) == [False, True, False]
        assert castling_det.any_branch_active(backbone)  # one block's branch still runs
        assert torch.equal(backbone(x)["last_feat"], mixed)

        with castling_det.softmax_branch(backbone, False):
            assert _branch_states(backbone) == [False, False, False]
            assert not castling_det.any_branch_active(backbone)
            assert torch.equal(backbone(x)["last_feat"], all_off)
        with castling_det.softmax_branch(backbone, True, scale=0.0):
            assert not castling_det.any_branch_active(backbone)  # scale 0 skips the branch
        assert _branch_states(backbone) == [False, True, False]

        # restored on the way out of an exception too
        with pytest.raises(RuntimeError, match="boom"):
            with castling_det.softmax_branch(backbone, True):
                raise RuntimeError("boom")
        assert _branch_states(backbone) == [False, True, False]
    assert (all_on - all_off).abs().max().item() > 1e-3
    assert (mixed - all_off).abs().max().item() > 1e-4


def test_softmax_branch_config_key_sets_initial_state(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.BRANCH.ENABLED = False
    assert _branch_states(_build(cfg)) == [False, False]


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------
def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


_BAD_VALUES = [
    ("MODEL.CASTLING.SIZE", "XL"),
    ("MODEL.CASTLING.NUM_HEADS", 3),
    ("MODEL.CASTLING.ATTN_KINDS", ["castling", "performer"]),
    ("MODEL.CASTLING.ATTN_KINDS", ["castling", "softmax", "castling"]),  # wrong length
    ("MODEL.CASTLING.OUT_FEATURES", ["block7"]),
    ("MODEL.CASTLING.BRANCH.THRESHOLD", -0.1),
    ("MODEL.CASTLING.CONV_KIND", "diagonal"),
]
# The FPN adapter replaces OUT_FEATURES by MODEL.FPN.IN_FEATURES, so that key is bare-only.
_BAD_CASES = [
    pytest.param(name, key, value, id=f"{short}-{key.split('.')[-1]}-{index}")
    for short, name in (("bare", "build_castling_vit_backbone"),
                        ("fpn", "build_castling_vit_fpn_backbone"),
                        ("retina", "build_retinanet_castling_vit_fpn_backbone"))
    for index, (key, value) in enumerate(_BAD_VALUES)
    if short == "bare" or key != "MODEL.CASTLING.OUT_FEATURES"
]


@pytest.mark.parametrize("backbone_name,key,value", _BAD_CASES)
def test_config_validation_names_the_key(make_castling_cfg, backbone_name, key, value):
    cfg = make_castling_cfg(backbone_name)
    _set(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(key)):
        build_backbone(cfg)


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.CASTLING.CONV_KERNEL_SIZE", 4),
        ("MODEL.CASTLING.BRANCH.CHUNK_SIZE", -3),
        ("MODEL.CASTLING.PRETRAIN_IMG_SIZE", 100),
        ("MODEL.CASTLING.OUT_FEATURES", []),
        ("MODEL.CASTLING.DEPTH", -1),
        ("MODEL.CASTLING.DROP_PATH_RATE", 1.5),
        ("MODEL.FPN.IN_FEATURES", ["res5"]),
        ("MODEL.FPN.IN_FEATURES", ["last_feat", "block0"]),
    ],
    ids=["even_kernel", "negative_chunk", "pretrain_size", "no_out_features", "negative_depth",
         "drop_path", "fpn_in_feature", "fpn_two_in_features"],
)
def test_other_bad_values_name_the_key(make_castling_cfg, key, value):
    name = "build_castling_vit_fpn_backbone" if key.startswith("MODEL.FPN") else (
        "build_castling_vit_backbone"
    )
    cfg = make_castling_cfg(name)
    _set(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(key)):
        build_backbone(cfg)


def test_zero_window_size_raises_for_window_blocks(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["window"]
    cfg.MODEL.CASTLING.WINDOW_SIZE = 0
    with pytest.raises(ValueError, match="MODEL.CASTLING.WINDOW_SIZE"):
        build_backbone(cfg)
    cfg.MODEL.CASTLING.ATTN_KINDS = ["castling"]  # the window size is not used then
    backbone = build_backbone(cfg)
    assert all(isinstance(block.attn, LinearAngularAttention) for block in backbone.blocks)


def test_valid_config_variants_build(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["softmax", "castling"]  # one per block
    cfg.MODEL.CASTLING.CONV_KIND = "grid"
    cfg.MODEL.CASTLING.BRANCH.MASK = "absolute"  # the paper's mask, not the default
    cfg.MODEL.CASTLING.BRANCH.THRESHOLD = 0.0
    cfg.MODEL.CASTLING.BRANCH.CHUNK_SIZE = 0  # all at once
    backbone = _build(cfg)
    assert backbone.blocks[1].attn.conv_kind == "grid"
    assert backbone.blocks[1].attn.branch_mask == "absolute"
    assert backbone.blocks[1].attn.branch_chunk_size is None
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))["last_feat"]
    assert out.shape == (1, EMBED_DIM, 4, 6)


def test_size_presets_without_overrides(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.SIZE = "Ti"
    cfg.MODEL.CASTLING.EMBED_DIM = 0
    cfg.MODEL.CASTLING.DEPTH = 0
    cfg.MODEL.CASTLING.NUM_HEADS = 0
    backbone = build_backbone(cfg)
    assert backbone.output_shape()["last_feat"].channels == 192
    assert len(backbone.blocks) == 12
    assert backbone.blocks[0].attn.num_heads == 3


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["castling", "window"]
    cfg.MODEL.CASTLING.WINDOW_SIZE = 3
    plain = build_backbone(cfg).train()
    cfg.MODEL.CASTLING.USE_ACT_CHECKPOINT = True
    checkpointed = build_backbone(cfg).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 80, 112)
    outputs, grads = [], []
    for model in (plain, checkpointed):
        out = model(x)["last_feat"]
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_drop_path_rises_linearly_over_the_blocks(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.CASTLING.DEPTH = 3
    cfg.MODEL.CASTLING.DROP_PATH_RATE = 0.2
    model = build_backbone(cfg)
    assert [block.drop_path.p for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["last_feat"], model(x)["last_feat"])  # no dropping in eval


# --------------------------------------------------------------------------------------------
# MODEL.BACKBONE.FREEZE_AT and intermediate outputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_at, frozen_blocks", [(0, 0), (1, 0), (2, 1), (3, 2)])
def test_freeze_at_freezes_the_embeddings_then_the_first_blocks(make_castling_cfg, freeze_at, frozen_blocks):
    cfg = make_castling_cfg("build_castling_vit_fpn_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    backbone = _build(cfg).train()
    vit = backbone.net
    embeddings_trainable = [vit.pos_embed.requires_grad, vit.patch_embed.proj.weight.requires_grad]
    assert embeddings_trainable == [freeze_at == 0] * 2
    for index, block in enumerate(vit.blocks):
        assert all(p.requires_grad == (index >= frozen_blocks) for p in block.parameters()), index
    # the pyramid is never frozen, and a frozen stage gets no gradient in a backward pass
    assert all(p.requires_grad for name, p in backbone.named_parameters() if not name.startswith("net."))
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    assert vit.patch_embed.proj.weight.grad is None if freeze_at else vit.patch_embed.proj.weight.grad is not None


def test_freeze_at_beyond_the_blocks_names_the_key(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = cfg.MODEL.CASTLING.DEPTH + 2
    with pytest.raises(ValueError, match="MODEL.BACKBONE.FREEZE_AT"):
        _build(cfg)


def test_blocks_after_the_last_output_are_not_built(make_castling_cfg):
    cfg = make_castling_cfg("build_castling_vit_fpn_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.CASTLING.DEPTH = 4
    cfg.MODEL.FPN.IN_FEATURES = ["block1"]
    backbone = _build(cfg).train()
    assert len(backbone.net.blocks) == 2
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    # every parameter takes part (DistributedDataParallel rejects unused ones)
    unused = [name for name, p in backbone.named_parameters() if p.grad is None]
    assert unused == []
