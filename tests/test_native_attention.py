"""Tests of the native deployed attention on CPU (castling_det/modeling/native_attention.py and
csrc/linear_angular_cpu.cpp): against the eager reference in fp32 and against float64 in bf16
and fp16, at N = 65,536 in fp16, q, k, v in the projection's strided layout, and the module's
dispatch to it. Builds the operator: skipped where ninja or a C++ compiler is missing, failed
where they are present and the build is not (the fallback's warning is tested in
test_blocked_attention.py, without a compiler)."""
import shutil

import pytest
import torch
from torch.utils import cpp_extension

from castling_det.modeling import attention, native_attention
from castling_det.modeling.native_attention import native_attention_available, native_linear_angular_attention
from test_blocked_attention import CONVS, TOKEN_BOUND, _eager, _module, _token_error, check_low_precision_error

# What torch.utils.cpp_extension.load needs and this machine lacks.
_MISSING_TOOLS = [
    name for name, found in [
        ("ninja", cpp_extension.is_ninja_available()),
        ("a C++ compiler", shutil.which(cpp_extension.get_cxx_compiler()) is not None),
    ] if not found
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING_TOOLS), reason=f"building the native operator needs {' and '.join(_MISSING_TOOLS)}"
)


def test_the_operator_builds_where_its_tools_are():
    # A broken csrc/linear_angular_cpu.cpp fails here (its compiler output is in the log above)
    # instead of leaving every model on the blocked fallback.
    assert native_attention._load(), "the native operator did not build: see the logged warning"


def _run(module, q, k, v, height, width, **kwargs):
    with torch.no_grad():
        return native_linear_angular_attention(
            q, k, v, module.dwconv.weight, conv_kind=module.conv_kind, height=height, width=width,
            linear_weight=module.linear_weight, eps=module.eps, **kwargs,
        )


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("conv_kind,kernel_size", CONVS, ids=[f"{c}{k}" for c, k in CONVS])
@pytest.mark.parametrize("block_tokens", [3, 16, None], ids=["blocks-inside-the-halo", "ragged-blocks", "default"])
def test_native_equals_the_eager_reference_in_fp32(conv_kind, kernel_size, learned, block_tokens):
    torch.manual_seed(0)
    module = _module(conv_kind, kernel_size, learned)
    height, width = 5, 7  # 35 tokens: blocks of 3 (fewer than the 9x1 halo of 4 a side), 16
    with torch.no_grad():
        q, k, v = module._project_qkv(torch.randn(2, height, width, 32))
    assert not q.is_contiguous() and q.stride(-1) == 1  # the projection's strided views
    out = _run(module, q, k, v, height, width, block_tokens=block_tokens)
    reference = _eager(module.double(), q.double(), k.double(), v.double(), height, width)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert _token_error(out, reference) <= TOKEN_BOUND[torch.float32]
    assert out.transpose(1, 2).is_contiguous()  # (B, N, heads, d), as the output projection reads it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("conv_kind,kernel_size", [("seq", 9), ("grid", 3)], ids=["seq9", "grid3"])
def test_low_precision_error_against_float64(conv_kind, kernel_size, dtype):
    check_low_precision_error(conv_kind, kernel_size, dtype, batch=2,
                              attend=lambda *args: _run(*args, block_tokens=8))


def test_fp16_at_65536_tokens_stays_finite_and_accurate():
    """Nearly aligned tokens make k̂ᵀv about N·|v|, far past fp16's range: it is summed in fp32."""
    torch.manual_seed(2)
    height = width = 256
    direction = torch.randn(1, 1, 1, 16)
    q, k = (direction + 0.01 * torch.randn(1, 1, height * width, 16) for _ in range(2))
    v = torch.rand(1, 1, height * width, 16) * 4
    module = _module("seq", 9, learned=False, dim=16, heads=1)
    with torch.no_grad():
        module.dwconv.weight.normal_(std=0.1)
    module = module.half()
    out = _run(module, q.half(), k.half(), v.half(), height, width)
    reference = _eager(module.double(), q.half().double(), k.half().double(), v.half().double(), height, width)
    assert torch.isfinite(out).all()
    assert _token_error(out, reference) <= TOKEN_BOUND[torch.float16]


def test_all_zero_tokens_give_the_convolution_alone():
    module = _module("seq", 9, learned=False)
    with torch.no_grad():
        q, k, v = (t.clone() for t in module._project_qkv(torch.randn(1, 4, 4, 32)))
        for t in (q, k, v):  # five all-zero tokens: the normalised sum is 0 there, not NaN
            t[:, :, :5] = 0
        k[:, :, 5:9] = 0
    out = _run(module, q, k, v, 4, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _eager(module, q, k, v, 4, 4), rtol=1e-5, atol=1e-6)


def test_the_module_runs_native_in_inference_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "native_linear_angular_attention",
                        lambda *a, **kw: calls.append(1) or native_linear_angular_attention(*a, **kw))
    module = _module("seq", 9, learned=True)
    with torch.no_grad():
        module.attend(*module._project_qkv(torch.randn(1, 3, 4, 32)), 3, 4)
    assert calls == [1]


def test_availability_rules():
    q = torch.zeros(1, 2, 6, 16)
    assert native_attention_available(q) and native_attention_available(q.bfloat16())
    assert not native_attention_available(q.double())  # the blocked operator's, in float64
    assert not native_attention_available(torch.zeros(1, 2, 0, 16))  # no tokens
    assert not native_attention_available(torch.zeros(1, 2, 16, 6).transpose(-2, -1))  # strided last dim
