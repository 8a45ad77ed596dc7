"""Tests of the blocked deployed attention on CPU (castling_det/modeling/blocked_attention.py):
against the eager reference in float64 (equal up to float64 rounding), against float64 in the
low-precision dtypes, at N = 65,536 in fp16, and the module's dispatch to it, which happens
where the native operator cannot be built (as every test here pretends) and in float64."""
import copy
import logging

import pytest
import torch
import torch.utils.cpp_extension

from castling_det import LinearAngularAttention
from castling_det.modeling import attention, native_attention
from castling_det.modeling.blocked_attention import (
    blocked_attention_available,
    blocked_linear_angular_attention,
)

# Per-token error ‖out − ref‖ / ‖ref‖ against float64 on the same rounded q, k, v and weights:
# the output is rounded at most twice (with the grid convolution: its output, then the sum), so
# about 2u (bf16 u = 2^-8, fp16 u = 2^-11), and 3u leaves room for the fp32 arithmetic.
TOKEN_BOUND = {torch.float32: 1e-6, torch.bfloat16: 3 * 2.0**-8, torch.float16: 3 * 2.0**-11}


@pytest.fixture(autouse=True)
def no_native_operator(monkeypatch):
    """The module's CPU dispatch as on a machine where the native operator did not build."""
    monkeypatch.setattr(attention, "native_attention_available", lambda q: False)


def test_a_failed_native_build_warns_and_leaves_the_blocked_operator(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING):
        assert native_attention._load.__wrapped__() is False  # the uncached build attempt
    assert "no C++ compiler" in caplog.text and "blocked operator runs instead" in caplog.text


def _module(conv_kind, kernel_size, learned, dim=32, heads=2):
    module = LinearAngularAttention(
        dim=dim, num_heads=heads, conv_kind=conv_kind, conv_kernel_size=kernel_size,
        learn_linear_weight=learned, softmax_branch=False,
    ).eval()
    if learned:
        with torch.no_grad():
            module.linear_weight.copy_(torch.tensor([0.5, 2.5]).view(2, 1, 1))
    return module


def _eager(module, q, k, v, height, width):
    """The module's eager reference (fused operators off)."""
    reference = copy.deepcopy(module)
    reference.fused = False
    with torch.no_grad():
        return reference.attend(q, k, v, height, width)


def _token_error(out, reference):
    return ((out.double() - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-30)).max().item()


CONVS = [("seq", 9), ("grid", 3), ("grid", 5)]


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("conv_kind,kernel_size", CONVS, ids=[f"{c}{k}" for c, k in CONVS])
@pytest.mark.parametrize(
    "block_tokens", [3, 16, None], ids=["blocks-inside-the-halo", "ragged-blocks", "one-block"]
)
def test_blocked_equals_the_eager_reference_in_float64(conv_kind, kernel_size, learned, block_tokens):
    torch.manual_seed(0)
    module = _module(conv_kind, kernel_size, learned).double()
    # 35 tokens: blocks of 16, 16 and 3, or of 3 (fewer than the 9x1 convolution's halo of 4 a side)
    height, width = 5, 7
    with torch.no_grad():
        q, k, v = module._project_qkv(torch.randn(2, height, width, 32, dtype=torch.float64))
        out = blocked_linear_angular_attention(
            q, k, v, module.dwconv.weight, conv_kind=conv_kind, height=height, width=width,
            linear_weight=module.linear_weight, eps=module.eps, block_tokens=block_tokens,
        )
    reference = _eager(module, q, k, v, height, width)
    assert out.shape == reference.shape and out.dtype == torch.float64
    assert (out - reference).abs().max().item() < 1e-12
    # Laid out as the output projection reads it: (B, N, heads, d) contiguous.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", list(TOKEN_BOUND), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("conv_kind,kernel_size", [("seq", 9), ("grid", 3)], ids=["seq9", "grid3"])
def test_low_precision_error_against_float64(conv_kind, kernel_size, dtype):
    check_low_precision_error(conv_kind, kernel_size, dtype, batch=1, attend=lambda module, *args: module.attend(*args))


def check_low_precision_error(conv_kind, kernel_size, dtype, batch, attend):
    """``attend(module, q, k, v, height, width)`` in ``dtype`` is within TOKEN_BOUND of the float64
    eager reference, on a 6×9 grid with a learned linear weight (shared with the native operator's test)."""
    torch.manual_seed(1)
    module = _module(conv_kind, kernel_size, learned=True).to(dtype)
    height, width = 6, 9
    with torch.no_grad():
        q, k, v = module._project_qkv(torch.randn(batch, height, width, 32).to(dtype))
        out = attend(module, q, k, v, height, width)
    reference = _eager(module.double(), q.double(), k.double(), v.double(), height, width)
    assert out.dtype == dtype
    assert _token_error(out, reference) <= TOKEN_BOUND[dtype]


def test_all_zero_tokens_give_the_convolution_alone():
    module = _module("grid", 3, learned=False)
    with torch.no_grad():
        q, k, v = module._project_qkv(torch.randn(1, 4, 4, 32))
        q, k, v = q.clone(), k.clone(), v.clone()
        for t in (q, k, v):  # five all-zero tokens: the normalised sum is 0 there, not NaN
            t[:, :, :5] = 0
        k[:, :, 5:9] = 0  # and zero keys elsewhere
        out = module.attend(q, k, v, 4, 4)
        conv = attention._grid_conv(v, module.dwconv.weight, 4, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :5], conv[:, :, :5])
    torch.testing.assert_close(out, _eager(module, q, k, v, 4, 4), rtol=1e-5, atol=1e-6)


def test_fp16_at_65536_tokens_stays_finite_and_accurate():
    """Nearly aligned tokens make k̂ᵀv about N·|v|, far past fp16's range: it is summed in fp32."""
    torch.manual_seed(2)
    height = width = 256
    direction = torch.randn(1, 1, 1, 16)
    q, k = (direction + 0.01 * torch.randn(1, 1, height * width, 16) for _ in range(2))
    v = torch.rand(1, 1, height * width, 16) * 4
    weight = torch.randn(1, 1, 9, 1) * 0.1
    q, k, v, weight = (t.half() for t in (q, k, v, weight))
    with torch.no_grad():
        out = blocked_linear_angular_attention(q, k, v, weight, conv_kind="seq", height=height, width=width)
    module = LinearAngularAttention(dim=16, num_heads=1, softmax_branch=False).double().eval()
    with torch.no_grad():
        module.dwconv.weight.copy_(weight.double())
    reference = _eager(module, q.double(), k.double(), v.double(), height, width)
    assert torch.isfinite(out).all()
    assert _token_error(out, reference) <= TOKEN_BOUND[torch.float16]


class _Spy:
    """Stands in for the blocked operator and records that it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return blocked_linear_angular_attention(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(attention, "blocked_linear_angular_attention", spy)
    return spy


def _attend(module, grad=False):
    q, k, v = module._project_qkv(torch.randn(1, 3, 4, 32))
    with torch.set_grad_enabled(grad):
        return module.attend(q, k, v, 3, 4)


def test_eval_without_gradient_runs_blocked_on_cpu(spy):
    _attend(_module("seq", 9, learned=True))
    assert spy.calls == 1


@pytest.mark.parametrize("case", ["fused off", "gradient", "branch on at inference", "branch on in training"])
def test_other_cases_run_the_eager_reference(spy, case):
    module = _module("seq", 9, learned=False)
    if case == "fused off":
        module.fused = False
    elif case == "branch on at inference":
        module.softmax_branch = True
        module.branch_at_inference = True
    elif case == "branch on in training":  # no gradient asked for: the branch alone decides
        module.softmax_branch = True
        module.train()
    out = _attend(module, grad=case == "gradient")
    assert spy.calls == 0
    if case == "gradient":
        out.sum().backward()  # the eager path records the graph
        assert module.qkv.weight.grad is not None


def test_availability_rules():
    q = torch.zeros(1, 2, 6, 16)
    assert blocked_attention_available(q)
    assert not blocked_attention_available(q.long())
    assert not blocked_attention_available(torch.zeros(1, 2, 0, 16))  # no tokens
    assert not blocked_attention_available(torch.zeros(2, 6, 16))
