"""Tests of the accuracy options of linear-angular attention: the branch's masks that scale with
the token count, the learned weight of the linear term, and that the whole deployed backbone stays
linear in N with each option on."""
import math

import pytest
import torch
import torch.nn.functional as F

from castling_det import CastlingViT, LinearAngularAttention, set_softmax_branch
from castling_det.engine.optimizer import build_optimizer
from castling_det.modeling.attention import (
    branch_keep_mask,
    deployed_linear_angular_attention,
    masked_softmax_attention,
)
from conftest import largest_output


# --------------------------------------------------------------------------------------------
# Masks of the softmax branch
# --------------------------------------------------------------------------------------------
def _fresh_softmax(num_tokens: int, rows: int = 64) -> torch.Tensor:
    """Softmax rows of a freshly initialised model: logits of a few hundredths, near uniform."""
    logits = torch.randn(rows, num_tokens, generator=torch.Generator().manual_seed(num_tokens)) * 0.03
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("num_tokens", [520, 4096])
def test_absolute_mask_is_empty_on_a_fresh_softmax_but_relative_and_topk_are_not(num_tokens):
    attn = _fresh_softmax(num_tokens)
    assert attn.max().item() < 0.02  # why the paper's absolute threshold keeps nothing here
    assert not branch_keep_mask(attn, "absolute", 0.02, topk=32).any()

    relative = branch_keep_mask(attn, "relative", 1.0, topk=32)
    kept_per_row = relative.sum(-1).float() / num_tokens
    # logits symmetric around their mean: about half the weights are above 1/N in every row
    assert ((kept_per_row > 0.35) & (kept_per_row < 0.65)).all()
    assert torch.equal(relative, attn >= 1.0 / num_tokens)

    topk = branch_keep_mask(attn, "topk", 0.0, topk=32)
    assert (topk.sum(-1) == 32).all()
    # the kept ones are the 32 largest of each row
    smallest_kept = attn.masked_fill(~topk, 2.0).min(-1).values
    largest_dropped = attn.masked_fill(topk, -1.0).max(-1).values
    assert (smallest_kept > largest_dropped).all()


@pytest.mark.parametrize("num_tokens", [520, 4096])
def test_relative_and_topk_masks_keep_an_exactly_uniform_softmax(num_tokens):
    attn = torch.zeros(4, num_tokens).softmax(dim=-1)
    assert branch_keep_mask(attn, "relative", 1.0, topk=32).all()
    assert branch_keep_mask(attn, "topk", 0.0, topk=32).sum(-1).min().item() >= 32
    # twice the uniform weight is more than any weight of a uniform row
    assert not branch_keep_mask(attn, "relative", 2.0, topk=32).any()


def test_topk_larger_than_the_row_keeps_everything():
    attn = torch.rand(3, 10).softmax(-1)
    assert branch_keep_mask(attn, "topk", 0.0, topk=50).all()


@pytest.mark.parametrize("mask, threshold", [("relative", 1.3), ("topk", 0.0)])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_masked_branch_with_new_masks_matches_a_float64_reference(mask, threshold, chunk_size):
    q, k, v = (torch.randn(2, 2, 40, 16) * s for s in (1.5, 1.5, 1.0))
    out, mass = masked_softmax_attention(
        q, k, v, threshold=threshold, mask=mask, topk=5, chunk_size=chunk_size
    )
    attn = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 4.0, dim=-1)
    if mask == "relative":
        kept = attn >= threshold / 40
    else:  # the 5 largest of each row, by sorting
        fifth = attn.sort(dim=-1, descending=True).values[..., 4:5]
        kept = attn >= fifth
        assert (kept.sum(-1) == 5).all()
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(out.double(), (attn * kept) @ v.double(), rtol=0, atol=1e-5)
    assert mass.item() == pytest.approx((attn * kept).sum(-1).mean().item(), abs=1e-6)


def test_module_rejects_bad_mask_settings():
    with pytest.raises(ValueError, match="branch_mask"):
        LinearAngularAttention(dim=64, num_heads=2, branch_mask="soft")
    with pytest.raises(ValueError, match="branch_topk"):
        LinearAngularAttention(dim=64, num_heads=2, branch_mask="topk", branch_topk=0)


def test_relative_mask_gives_the_branch_gradient_from_the_first_step():
    """The point of the relative mask: at initialisation the branch output and the kept mass
    depend on q and k, where the absolute 0.02 mask gives them no gradient at all."""
    x = torch.randn(2, 20, 26, 192)  # N = 520, as in the BCCD benchmark
    grads = {}
    for mask, threshold in (("absolute", 0.02), ("relative", 1.0)):
        torch.manual_seed(0)
        module = LinearAngularAttention(
            dim=192, num_heads=3, branch_mask=mask, branch_threshold=threshold
        ).train()
        torch.nn.init.trunc_normal_(module.qkv.weight, std=0.02)  # CastlingViT's init
        module(x)
        mass = module.branch_stats["mass"]
        if mass.requires_grad:
            mass.backward()
        q_rows = module.qkv.weight.grad
        grads[mask] = 0.0 if q_rows is None else q_rows.abs().sum().item()
        grads[mask + "_mass"] = mass.item()
    assert grads["absolute_mass"] == 0.0 and grads["absolute"] == 0.0
    assert 0.3 < grads["relative_mass"] < 0.7
    assert grads["relative"] > 0


# --------------------------------------------------------------------------------------------
# Learned weight of the linear term
# --------------------------------------------------------------------------------------------
def _reference_with_linear_weight(module, x, weight):
    """Float64: normalize(0.5 v + (w_h / pi) q^(k^T v)) + 3x3 grid conv of v, then the projection."""
    batch, height, width, channels = x.shape
    heads, head_dim = module.num_heads, channels // module.num_heads
    qkv = x.double().reshape(batch, -1, channels) @ module.qkv.weight.double().t() + module.qkv.bias.double()
    q, k, v = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    linear = F.normalize(q, dim=-1) @ (F.normalize(k, dim=-1).transpose(-2, -1) @ v)
    mixed = F.normalize(0.5 * v + weight.double().view(1, heads, 1, 1) / math.pi * linear, dim=-1)
    grid = v.transpose(-2, -1).reshape(batch, channels, height, width)
    conv = F.conv2d(grid, module.dwconv.weight.double(), padding=1, groups=channels)
    mixed = mixed + conv.reshape(batch, heads, head_dim, -1).transpose(-2, -1)
    merged = mixed.transpose(1, 2).reshape(batch, height, width, channels)
    return merged @ module.proj.weight.double().t() + module.proj.bias.double()


def test_learned_linear_weight_matches_reference_and_learns():
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kind="grid", conv_kernel_size=3, softmax_branch=False,
        learn_linear_weight=True,
    )
    assert module.linear_weight.shape == (2, 1, 1)
    assert torch.equal(module.linear_weight.detach().flatten(), torch.ones(2))  # the paper's value
    with torch.no_grad():
        module.qkv.weight.normal_(0, 0.2)
        module.linear_weight.copy_(torch.tensor([3.0, 0.25]).view(2, 1, 1))
    x = torch.randn(2, 4, 5, 64)
    out = module(x)
    expected = _reference_with_linear_weight(module, x, torch.tensor([3.0, 0.25]))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # a different weight gives a different output (the weight is really used)
    unweighted = _reference_with_linear_weight(module, x, torch.ones(2))
    assert (unweighted - expected).abs().max() > 1e-2

    out.square().sum().backward()
    assert module.linear_weight.grad is not None and (module.linear_weight.grad.abs() > 0).all()


def test_deployed_form_uses_the_learned_linear_weight():
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kind="grid", conv_kernel_size=3, softmax_branch=False,
        learn_linear_weight=True,
    ).eval()
    with torch.no_grad():
        module.linear_weight.copy_(torch.tensor([2.0, 0.5]).view(2, 1, 1))
    q, k, v = (torch.randn(1, 2, 20, 32) for _ in range(3))
    expected = module.attend(q, k, v, 4, 5)
    deployed = deployed_linear_angular_attention(
        q, k, v, module.dwconv.weight, conv_kind="grid", height=4, width=5,
        linear_weight=module.linear_weight,
    )
    torch.testing.assert_close(deployed, expected, rtol=1e-5, atol=1e-5)
    without = deployed_linear_angular_attention(
        q, k, v, module.dwconv.weight, conv_kind="grid", height=4, width=5
    )
    assert (without - expected).abs().max() > 1e-3


def test_learned_linear_weight_has_no_weight_decay(make_detector_cfg):
    from detectron2.modeling import build_model

    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.MODEL.CASTLING.LEARN_LINEAR_WEIGHT = True
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    model = build_model(cfg)
    weights = {id(m.attn.linear_weight) for m in model.backbone.net.blocks}
    assert len(weights) == cfg.MODEL.CASTLING.DEPTH
    optimizer = build_optimizer(cfg, model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert all(decay_of[w] == 0.0 for w in weights)
    qkv = model.backbone.net.blocks[0].attn.qkv.weight
    assert decay_of[id(qkv)] == 0.05  # control: ordinary weights keep theirs


# --------------------------------------------------------------------------------------------
# The config keys reach the modules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, expected_threshold", [("absolute", 0.02), ("relative", 1.5), ("topk", 0.02)]
)
def test_config_keys_reach_every_block(make_castling_cfg, mask, expected_threshold):
    from detectron2.layers import ShapeSpec
    from castling_det import build_castling_vit_backbone

    cfg = make_castling_cfg()
    cfg.MODEL.CASTLING.BRANCH.MASK = mask
    cfg.MODEL.CASTLING.BRANCH.RELATIVE_THRESHOLD = 1.5
    cfg.MODEL.CASTLING.BRANCH.TOPK = 7
    vit = build_castling_vit_backbone(cfg, ShapeSpec(channels=3))
    for block in vit.blocks:
        assert (block.attn.branch_mask, block.attn.branch_threshold, block.attn.branch_topk) == (
            mask, expected_threshold, 7,
        )


def test_default_config_branch_is_alive_in_every_block_of_a_fresh_model(make_castling_cfg):
    """The default recipe's branch carries signal from the first iteration: a freshly built
    backbone keeps more than 5 % of the softmax mass in every block at N = 520 (BCCD's 427x320)."""
    from detectron2.layers import ShapeSpec
    from castling_det import build_castling_vit_backbone

    vit = build_castling_vit_backbone(make_castling_cfg(), ShapeSpec(channels=3)).train()
    vit(torch.randn(1, 3, 320, 427))
    masses = [block.attn.branch_stats["mass"].item() for block in vit.blocks]
    assert all(mass > 0.05 for mass in masses), masses


@pytest.mark.parametrize(
    "key, value",
    [("BRANCH.MASK", "soft"), ("BRANCH.TOPK", 0), ("BRANCH.RELATIVE_THRESHOLD", -1.0)],
)
def test_bad_mask_config_names_the_key(make_castling_cfg, key, value):
    from detectron2.layers import ShapeSpec
    from castling_det import build_castling_vit_backbone

    cfg = make_castling_cfg()
    cfg.merge_from_list([f"MODEL.CASTLING.{key}", value])
    with pytest.raises(ValueError, match=f"MODEL.CASTLING.{key}"):
        build_castling_vit_backbone(cfg, ShapeSpec(channels=3))


# --------------------------------------------------------------------------------------------
# The whole deployed backbone allocates no N x N tensor, with every option on
# --------------------------------------------------------------------------------------------
BACKBONE_OPTIONS = {
    "seq9": dict(conv_kind="seq", conv_kernel_size=9),
    "grid3": dict(conv_kind="grid", conv_kernel_size=3),
    "grid5": dict(conv_kind="grid", conv_kernel_size=5),
    "grid7": dict(conv_kind="grid", conv_kernel_size=7),
    "relative_mask": dict(branch_mask="relative", branch_threshold=1.0),
    "topk_mask": dict(branch_mask="topk", branch_topk=32),
    "learned_weight": dict(learn_linear_weight=True),
    "hybrid_windows": dict(attn_kinds=["window", "castling"], window_size=14),
    # The options above run the native CPU operator (the default in inference); this, the eager one.
    "eager_reference": dict(fused=False),
}


@pytest.mark.parametrize("options", list(BACKBONE_OPTIONS.values()), ids=list(BACKBONE_OPTIONS))
def test_deployed_backbone_forms_no_quadratic_tensor(options):
    image = torch.randn(1, 3, 1024, 1024)  # 64 x 64 = 4096 tokens
    num_tokens = 64 * 64
    vit = CastlingViT(
        embed_dim=64, depth=2, num_heads=2, branch_chunk_size=None, softmax_branch=False, **options
    ).eval()
    numel, shape = largest_output(vit, image)
    assert numel < num_tokens * num_tokens, f"the deployed backbone formed a tensor of shape {shape}"

    # positive control: the same backbone with its (unchunked) branch on forms N x N scores
    set_softmax_branch(vit, True)
    numel_on, shape_on = largest_output(vit, image)
    assert numel_on >= num_tokens * num_tokens, shape_on


def _terms_in_float64(module, q, k, v):
    """For a 2-head, 32-wide grid-conv module on a 3 x 4 token grid: v and the linear term, the
    branch (absolute mask 0.02) and the convolution, in float64."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    attn = torch.softmax(q64 @ k64.transpose(-2, -1) / 4.0, dim=-1)
    branch = (attn * (attn > 0.02)) @ v64
    linear = F.normalize(q64, dim=-1) @ (F.normalize(k64, dim=-1).transpose(-2, -1) @ v64) / math.pi
    conv = F.conv2d(
        v64.transpose(-2, -1).reshape(1, 32, 3, 4), module.dwconv.weight.double(), padding=1, groups=32
    ).reshape(1, 2, 16, 12).transpose(-2, -1)
    return v64, linear, branch, conv


def test_branch_scale_between_zero_and_one_scales_the_branch_term():
    """What annealing does mid-way: the sum before the normalisation holds scale x the branch."""
    module = LinearAngularAttention(dim=32, num_heads=2, conv_kind="grid", conv_kernel_size=3)
    module.train()
    q, k, v = (torch.randn(1, 2, 12, 16) * 2 for _ in range(3))
    v64, linear, branch, conv = _terms_in_float64(module, q, k, v)
    outputs = {}
    for scale in (0.0, 0.3, 1.0):
        module.branch_scale = scale
        with torch.no_grad():
            outputs[scale] = module.attend(q, k, v, 3, 4).double()
        expected = F.normalize(0.5 * v64 + linear + scale * branch, dim=-1) + conv
        torch.testing.assert_close(outputs[scale], expected, rtol=0, atol=1e-5)
    assert (outputs[0.3] - outputs[0.0]).abs().max() > 1e-3 and (outputs[1.0] - outputs[0.3]).abs().max() > 1e-3


def test_branch_as_sum_multiplies_the_branch_by_the_token_count(make_castling_cfg):
    """The reference's branch is an average of v; as a sum it is N times that, before the
    normalisation, at any branch scale."""
    module = LinearAngularAttention(dim=32, num_heads=2, conv_kind="grid", conv_kernel_size=3, branch_as_sum=True)
    module.train()
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    v64, linear, branch, conv = _terms_in_float64(module, q, k, v)
    for scale in (0.5, 1.0):
        module.branch_scale = scale
        with torch.no_grad():
            out = module.attend(q, k, v, 3, 4).double()
        expected = F.normalize(0.5 * v64 + linear + scale * 12 * branch, dim=-1) + conv
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

    from detectron2.layers import ShapeSpec
    from castling_det import build_castling_vit_backbone

    cfg = make_castling_cfg()
    cfg.MODEL.CASTLING.BRANCH.AS_SUM = True
    assert all(b.attn.branch_as_sum for b in build_castling_vit_backbone(cfg, ShapeSpec(channels=3)).blocks)
