"""Tests of castling_det's LinearAngularAttention against an independent re-computation.

The reference below follows the authors' ``LinAngularAttention`` (Castling-ViT, CVPR 2023)
literally, in float64, from the module's own weights: per head

    x = [ (A * [A > t]) v + ] 0.5 v + (1/pi) q^ (k^T^ v),   A = softmax(q k^T / sqrt(d))
    x = x / |x| + DWConv(v)

with q^ = q/|q|, k^ = k/|k|; then the heads are merged and projected.
"""
import copy
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from castling_det import LinearAngularAttention, set_softmax_branch
from conftest import largest_output
from castling_det.modeling.attention import (
    deployed_linear_angular_attention,
    masked_softmax_attention,
)

THRESHOLD = 0.02


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------
def _seq_dwconv_reference(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The seed's ``Conv2d(h, h, (k, 1), padding=(k//2, 0), groups=h, bias=False)`` applied to v.

    v is read as a batch of h-channel images of height N (tokens) and width d (head channels):
    out[b, h, n, c] = sum_j w[h, j] * v[b, h, n + j - k//2, c], zero outside [0, N).
    """
    heads, one, ksize, width = weight.shape
    assert (one, width) == (1, 1), "seq conv must be a per-head (k x 1) filter"
    assert heads == v.shape[1]
    pad = ksize // 2
    num_tokens = v.shape[2]
    padded = F.pad(v, (0, 0, pad, pad))  # pad the token axis only
    out = torch.zeros_like(v)
    for j in range(ksize):
        out = out + weight[:, 0, j, 0].view(1, heads, 1, 1) * padded[:, :, j : j + num_tokens, :]
    return out


def _grid_dwconv_reference(
    v: torch.Tensor, weight: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Per-channel depthwise k x k convolution of v over the (H, W) token grid.

    Channel ``head * d + c`` of the grid holds v[:, head, :, c]; token n sits at (n // W, n % W).
    """
    batch, heads, num_tokens, head_dim = v.shape
    assert num_tokens == height * width
    channels, one, ksize, ksize2 = weight.shape
    assert (channels, one, ksize2) == (heads * head_dim, 1, ksize)
    # (B, h, N, d) -> (B, h, H, W, d) -> (B, h, d, H, W) -> (B, h*d, H, W)
    grid = v.reshape(batch, heads, height, width, head_dim).permute(0, 1, 4, 2, 3)
    grid = grid.reshape(batch, heads * head_dim, height, width)
    pad = ksize // 2
    padded = F.pad(grid, (pad, pad, pad, pad))
    out = torch.zeros_like(grid)
    for a in range(ksize):
        for b in range(ksize):
            tap = weight[:, 0, a, b].view(1, channels, 1, 1)
            out = out + tap * padded[:, :, a : a + height, b : b + width]
    # back to (B, h, N, d)
    out = out.reshape(batch, heads, head_dim, height, width).permute(0, 1, 3, 4, 2)
    return out.reshape(batch, heads, num_tokens, head_dim)


def reference_linear_angular(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias,
    conv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    num_heads: int,
    branch: bool,
    threshold: float = THRESHOLD,
    conv_kind: str = "seq",
):
    """Float64 re-computation of the seed formula. x: (B, H, W, C). Returns (out, A or None)."""
    x = x.double()
    batch, height, width, channels = x.shape
    num_tokens = height * width
    head_dim = channels // num_heads
    tokens = x.reshape(batch, num_tokens, channels)

    qkv = tokens @ qkv_weight.double().t()
    if qkv_bias is not None:
        qkv = qkv + qkv_bias.double()
    # (B, N, 3C) -> (3, B, h, N, d), the seed's reshape/permute
    qkv = qkv.reshape(batch, num_tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    attn = None
    if branch:
        attn = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        sparse = attn * (attn > threshold)
        branch_out = sparse @ v

    q_n = q / q.norm(dim=-1, keepdim=True)
    k_n = k / k.norm(dim=-1, keepdim=True)
    kv = k_n.transpose(-2, -1) @ v  # (B, h, d, d)
    mixed = 0.5 * v + (1.0 / math.pi) * (q_n @ kv)
    if branch:
        mixed = branch_out + mixed
    mixed = mixed / mixed.norm(dim=-1, keepdim=True)

    if conv_kind == "seq":
        mixed = mixed + _seq_dwconv_reference(v, conv_weight.double())
    else:
        mixed = mixed + _grid_dwconv_reference(v, conv_weight.double(), height, width)

    merged = mixed.transpose(1, 2).reshape(batch, num_tokens, channels)
    out = merged @ proj_weight.double().t() + proj_bias.double()
    return out.reshape(batch, height, width, channels), attn


def reference_from_module(
    module: LinearAngularAttention, x: torch.Tensor, *, branch: bool, threshold=None
):
    return reference_linear_angular(
        x,
        module.qkv.weight.detach(),
        None if module.qkv.bias is None else module.qkv.bias.detach(),
        module.dwconv.weight.detach(),
        module.proj.weight.detach(),
        module.proj.bias.detach(),
        num_heads=module.num_heads,
        branch=branch,
        threshold=module.branch_threshold if threshold is None else threshold,
        conv_kind=module.conv_kind,
    )


def _make_module(conv_kind: str, kernel_size: int, *, qkv_std: float = 0.1, **kwargs):
    """A 64-wide, 2-head module with weights large enough that the branch mask matters."""
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kind=conv_kind, conv_kernel_size=kernel_size, **kwargs
    )
    # The tests compare in eval mode, where the branch runs only when switched on explicitly.
    module.branch_at_inference = True
    with torch.no_grad():
        module.qkv.weight.normal_(0.0, qkv_std)
        if module.qkv.bias is not None:
            module.qkv.bias.normal_(0.0, 0.1)
        module.dwconv.weight.normal_(0.0, 0.3)
        module.proj.bias.normal_(0.0, 0.1)
    return module.eval()


def _input_away_from_threshold(module, shape=(2, 5, 7, 64), threshold=None):
    """A random input whose reference softmax weights all keep a 1e-6 margin from the threshold.

    fp32 and fp64 may disagree on the mask of a weight within rounding of the threshold (a jump of
    about threshold * |v| in the output), so such inputs are skipped, deterministically.
    """
    threshold = module.branch_threshold if threshold is None else threshold
    for seed in range(100):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        _, attn = reference_from_module(module, x, branch=True, threshold=threshold)
        if (attn - threshold).abs().min().item() > 1e-6:
            return x
    raise AssertionError("no input found whose softmax weights avoid the threshold")


def _assert_mask_is_exercised(attn: torch.Tensor, threshold: float = THRESHOLD):
    """The reference softmax must have weights on both sides of the threshold, none on the edge.

    Otherwise the masked branch would be either untested or numerically ambiguous between the
    fp32 module and the fp64 reference.
    """
    kept = (attn > threshold).double().mean().item()
    assert 0.05 < kept < 0.95, f"fraction of kept attention weights {kept} does not test the mask"
    assert (attn - threshold).abs().min().item() > 1e-6, "a weight sits on the threshold"


# --------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", [False, True], ids=["branch_off", "branch_on"])
@pytest.mark.parametrize("chunk_size", [None, 8], ids=["unchunked", "chunk8"])
def test_seq_conv_matches_seed_formula(branch, chunk_size):
    module = _make_module("seq", 9, softmax_branch=branch, branch_chunk_size=chunk_size)
    assert tuple(module.dwconv.weight.shape) == (2, 1, 9, 1)  # the seed's Conv2d(h, h, (9, 1))
    x = _input_away_from_threshold(module)  # shape (2, 5, 7, 64): non-square 5 x 7 grid, N = 35, batch 2

    with torch.no_grad():
        out = module(x)
    expected, attn = reference_from_module(module, x, branch=branch)

    assert out.dtype == torch.float32
    assert out.shape == (2, 5, 7, 64)
    if branch:
        _assert_mask_is_exercised(attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_branch_changes_output_and_reference_distinguishes_it():
    """Guard against a vacuous comparison: the branch must matter at the 1e-5 tolerance."""
    module = _make_module("seq", 9)
    x = _input_away_from_threshold(module)
    with torch.no_grad():
        module.softmax_branch = True
        on = module(x)
        module.softmax_branch = False
        off = module(x)
    assert (on - off).abs().max().item() > 1e-2
    # and the reference with the wrong branch setting does not match either output
    ref_off, _ = reference_from_module(module, x, branch=False)
    ref_on, _ = reference_from_module(module, x, branch=True)
    assert (on.double() - ref_off).abs().max().item() > 1e-2
    assert (off.double() - ref_on).abs().max().item() > 1e-2


def test_branch_threshold_is_used():
    module = _make_module("seq", 9, branch_threshold=0.05)
    x = _input_away_from_threshold(module)
    with torch.no_grad():
        out = module(x)
    expected, attn = reference_from_module(module, x, branch=True)
    _assert_mask_is_exercised(attn, 0.05)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # the default threshold gives a different answer
    other, _ = reference_linear_angular(
        x, module.qkv.weight.detach(), module.qkv.bias.detach(), module.dwconv.weight.detach(),
        module.proj.weight.detach(), module.proj.bias.detach(),
        num_heads=2, branch=True, threshold=THRESHOLD,
    )
    assert (out.double() - other).abs().max().item() > 1e-3


@pytest.mark.parametrize("branch", [False, True], ids=["branch_off", "branch_on"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_grid_conv_matches_reference(branch, kernel_size):
    module = _make_module("grid", kernel_size, softmax_branch=branch)
    assert tuple(module.dwconv.weight.shape) == (64, 1, kernel_size, kernel_size)
    x = _input_away_from_threshold(module)
    with torch.no_grad():
        out = module(x)
    expected, attn = reference_from_module(module, x, branch=branch)
    if branch:
        _assert_mask_is_exercised(attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_grid_conv_differs_from_a_transposed_grid():
    """The grid layout matters: reading the tokens as a W x H grid gives another result."""
    module = _make_module("grid", 3, softmax_branch=False)
    x = torch.randn(2, 5, 7, 64)
    with torch.no_grad():
        out = module(x)
    v = (
        F.linear(x.double().reshape(2, 35, 64), module.qkv.weight.double(), module.qkv.bias.double())
        .reshape(2, 35, 3, 2, 32)
        .permute(2, 0, 3, 1, 4)[2]
    )
    right = _grid_dwconv_reference(v, module.dwconv.weight.detach().double(), 5, 7)
    wrong = _grid_dwconv_reference(v, module.dwconv.weight.detach().double(), 7, 5)
    assert (right - wrong).abs().max().item() > 1e-2
    expected, _ = reference_from_module(module, x, branch=False)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_without_qkv_bias_matches_reference():
    module = _make_module("seq", 9, qkv_bias=False)
    assert module.qkv.bias is None
    x = _input_away_from_threshold(module)
    with torch.no_grad():
        out = module(x)
    expected, attn = reference_from_module(module, x, branch=True)
    _assert_mask_is_exercised(attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv_kind", ["seq", "grid"])
@pytest.mark.parametrize("branch", [False, True], ids=["branch_off", "branch_on"])
def test_all_zero_input_is_finite(conv_kind, branch):
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kind=conv_kind, conv_kernel_size=3, softmax_branch=branch
    )
    with torch.no_grad():
        module.qkv.bias.zero_()
        module.proj.bias.normal_()
    x = torch.zeros(2, 5, 7, 64, requires_grad=True)
    out = module(x)
    assert torch.isfinite(out).all()
    # q = k = v = 0: the normalised sum and the convolution vanish, only the projection bias is left
    torch.testing.assert_close(out, module.proj.bias.detach().expand(2, 5, 7, 64), rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, param in module.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_zero_tokens_among_nonzero_tokens_are_finite():
    """A single all-zero token (zero padding) must not poison the others through the sums."""
    module = LinearAngularAttention(dim=64, num_heads=2, qkv_bias=False, conv_kernel_size=3)
    x = torch.randn(1, 4, 6, 64)
    x[0, 0, 0] = 0.0
    with torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all()


def test_bf16_large_n_matches_fp32():
    """At N = 16384 tokens the bf16 module stays finite and close to fp32 (branch off)."""
    module = LinearAngularAttention(dim=64, num_heads=2, softmax_branch=False).eval()
    x = torch.randn(1, 128, 128, 64)
    with torch.no_grad():
        ref = module(x)
        module_bf16 = copy.deepcopy(module).to(torch.bfloat16)
        out = module_bf16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all()
    # the outputs are O(1) (normalised per head before a 64-wide projection), so an absolute
    # tolerance of 2e-2 is a few bf16 ulps of the largest entries
    assert ref.abs().max().item() < 4.0
    assert ref.abs().mean().item() > 0.05
    diff = (out.float() - ref).abs().max().item()
    assert diff < 2e-2, f"bf16 vs fp32 max abs difference {diff}"
    # relative to each token's output too, so that small outputs cannot hide large errors: bf16
    # keeps 8 significant bits (a relative rounding of 2^-9 = 2e-3 per element)
    token_error = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert token_error < 1.5e-2, f"worst token's relative error {token_error}"


def test_fp16_sum_over_many_aligned_tokens_does_not_overflow():
    """k̂ᵀv over N = 65,536 identical tokens reaches N·|v| ≈ 1e6, past fp16's 65,504.

    The operator sums in fp32 from fp16 q, k, v, so the fp16 output is finite and matches fp32.
    """
    module = LinearAngularAttention(dim=32, num_heads=1, softmax_branch=False).eval()
    x = (4.0 * torch.randn(1, 1, 1, 32)).expand(1, 256, 256, 32).contiguous()
    with torch.no_grad():
        ref = module(x)
        unscaled_sum = module.qkv(x[0, 0, 0]).chunk(3)[2].abs().max().item() * 256 * 256
        out = copy.deepcopy(module).half()(x.half())
    assert unscaled_sum > torch.finfo(torch.float16).max  # the case really overflows unscaled
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


def test_fp32_large_n_matches_float64_reference():
    """The 1/N rescaling inside the module is exact: at N = 4096 fp32 still matches float64."""
    module = _make_module("seq", 9, softmax_branch=False)
    x = torch.randn(1, 64, 64, 64)
    with torch.no_grad():
        out = module(x)
    expected, _ = reference_from_module(module, x, branch=False)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The deployed (reordered) form and its compiled path
# --------------------------------------------------------------------------------------------
def _has_cpu_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.parametrize("conv_kind,kernel_size", [("seq", 9), ("grid", 3)])
def test_deployed_form_matches_reference(conv_kind, kernel_size):
    """The reordered, branch-off form equals the seed formula in eager mode (no compiler)."""
    module = _make_module(conv_kind, kernel_size, softmax_branch=False)
    x = torch.randn(2, 6, 9, 64)
    with torch.no_grad():
        q, k, v = module._project_qkv(x)
        out = deployed_linear_angular_attention(
            q, k, v, module.dwconv.weight, conv_kind=conv_kind, height=6, width=9
        )
        out = module._project_out(out, 6, 9)
    expected, _ = reference_from_module(module, x, branch=False)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_deployed_form_keeps_the_eps_clamp_for_zero_tokens():
    module = _make_module("seq", 9, softmax_branch=False)
    x = torch.randn(1, 4, 4, 64)
    x[0, 0, :2] = 0.0
    with torch.no_grad():
        module.qkv.bias.zero_()  # zero tokens then give q = k = v = 0 exactly
        q, k, v = module._project_qkv(x)
        out = deployed_linear_angular_attention(
            q, k, v, module.dwconv.weight, conv_kind="seq", height=4, width=4
        )
        expected = module.attend(q, k, v, 4, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not _has_cpu_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("conv_kind,kernel_size", [("seq", 9), ("grid", 3)])
def test_compiled_tail_matches_eager_and_compiles_once_for_every_size(conv_kind, kernel_size):
    module = _make_module(conv_kind, kernel_size, softmax_branch=False)
    for index, (height, width) in enumerate([(6, 9), (5, 7), (8, 3)]):
        x = torch.randn(2, height, width, 64)
        with torch.no_grad():
            module.compile_tail = False
            eager = module(x)
            module.compile_tail = True
            # After the first size, a new one must reuse the compiled code.
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                compiled = module(x)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_compile_tail_is_not_used_with_the_branch_or_fp16(monkeypatch):
    """The fused form has no branch and no fp16 range guard: those inputs take the eager path."""
    import castling_det.modeling.attention as attention

    def fail():
        raise AssertionError("the compiled path was taken")

    monkeypatch.setattr(attention, "_compiled_deployed_attention", fail)
    module = _make_module("seq", 9, softmax_branch=True, compile_tail=True)
    x = torch.randn(1, 4, 5, 64)
    with torch.no_grad():
        expected, _ = reference_from_module(module, x, branch=True)
        torch.testing.assert_close(module(x).double(), expected, rtol=0, atol=1e-5)
        module.softmax_branch = False
        assert torch.isfinite(copy.deepcopy(module).half()(x.half())).all()
        with pytest.raises(AssertionError, match="compiled path"):
            module(x)  # the positive control: fp32 with the branch off does take it


# --------------------------------------------------------------------------------------------
# The masked softmax branch
# --------------------------------------------------------------------------------------------
def test_chunked_branch_equals_unchunked():
    q = torch.randn(2, 2, 40, 16) * 2.0
    k = torch.randn(2, 2, 40, 16) * 2.0
    v = torch.randn(2, 2, 40, 16)
    full, full_mass = masked_softmax_attention(q, k, v, threshold=THRESHOLD)
    chunked, chunked_mass = masked_softmax_attention(q, k, v, threshold=THRESHOLD, chunk_size=7)
    assert chunked.shape == full.shape == (2, 2, 40, 16)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_mass, full_mass, rtol=0, atol=1e-6)

    # the result is the masked softmax attention, and the mask does drop some weights
    attn = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 4.0, dim=-1)
    kept = attn > THRESHOLD
    assert kept.any() and (~kept).any()
    assert (attn - THRESHOLD).abs().min().item() > 1e-6
    expected = (attn * kept) @ v.double()
    torch.testing.assert_close(full.double(), expected, rtol=0, atol=1e-5)
    # the kept mass is the mean over queries of the softmax weights that survive the mask
    assert full_mass.item() == pytest.approx((attn * kept).sum(-1).mean().item(), abs=1e-6)
    assert 0 < full_mass.item() < 1
    unmasked, unmasked_mass = masked_softmax_attention(q, k, v, threshold=0.0)
    assert (unmasked - full).abs().max().item() > 1e-3
    assert unmasked_mass.item() == pytest.approx(1.0, abs=1e-6)


def test_checkpointed_chunks_give_the_unchunked_gradients():
    """In training the chunks are recomputed in the backward pass; the gradients must not change."""
    inputs = [torch.randn(1, 2, 40, 16) * s for s in (2.0, 2.0, 1.0)]
    grads = []
    for chunk_size in (None, 7):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, mass = masked_softmax_attention(*leaves, threshold=THRESHOLD, chunk_size=chunk_size)
        (out.square().sum() + mass).backward()
        grads.append([t.grad for t in leaves])
    for chunked, full in zip(grads[1], grads[0]):
        assert full.abs().max() > 0
        torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# No N x N tensor with the branch off
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv_kind", ["seq", "grid"])
def test_no_quadratic_tensor_with_branch_off(conv_kind):
    height = width = 64
    num_tokens = height * width  # 4096
    x = torch.randn(1, height, width, 64)
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kind=conv_kind, conv_kernel_size=3,
        softmax_branch=False, branch_chunk_size=None,
    ).eval()

    numel, shape = largest_output(module, x)
    assert numel < num_tokens * num_tokens, f"branch off formed a tensor of shape {shape}"

    # positive control: the same module with the (unchunked) branch on does form N x N scores
    set_softmax_branch(module, True)
    numel_on, shape_on = largest_output(module, x)
    assert numel_on >= num_tokens * num_tokens, shape_on


def test_chunked_branch_bounds_the_score_tensor():
    height = width = 64
    num_tokens = height * width
    x = torch.randn(1, height, width, 64)
    module = LinearAngularAttention(
        dim=64, num_heads=2, conv_kernel_size=3, softmax_branch=True, branch_chunk_size=512
    ).eval()
    set_softmax_branch(module, True)
    numel, shape = largest_output(module, x)
    assert numel >= 2 * 512 * num_tokens // 2, shape  # the branch did run
    # at most chunk x N scores per head (1 image, 2 heads)
    assert numel <= 2 * 512 * num_tokens, shape
    assert numel < num_tokens * num_tokens


# --------------------------------------------------------------------------------------------
# Constructor validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dim=64, num_heads=3), "dim=64 must be divisible by num_heads=3"),
        (dict(dim=64, num_heads=2, conv_kind="diagonal"), "conv_kind='diagonal' must be one of"),
        (dict(dim=64, num_heads=2, conv_kernel_size=4), "conv_kernel_size=4 must be a positive odd number"),
        (dict(dim=64, num_heads=2, conv_kernel_size=0), "conv_kernel_size=0 must be a positive odd number"),
        (dict(dim=64, num_heads=2, branch_threshold=-0.01), "branch_threshold=-0.01 must be >= 0"),
        (dict(dim=64, num_heads=2, branch_chunk_size=0), "branch_chunk_size=0 must be positive"),
    ],
    ids=["heads_not_dividing_dim", "unknown_conv_kind", "even_kernel", "zero_kernel",
         "negative_threshold", "zero_chunk"],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LinearAngularAttention(**kwargs)


def test_constructor_accepts_valid_edge_arguments():
    module = LinearAngularAttention(
        dim=64, num_heads=64, conv_kind="grid", conv_kernel_size=1, branch_threshold=0.0,
        branch_chunk_size=None,
    )
    out = module(torch.randn(1, 2, 3, 64))
    assert out.shape == (1, 2, 3, 64)
