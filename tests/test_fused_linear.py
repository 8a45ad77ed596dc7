"""Linear layers (bias, and fc1's GELU, inside oneDNN's GEMM) for bf16 inference on CPU."""
import pytest
import torch
from torch import nn

from castling_det.modeling import fused_linear
from castling_det.modeling.attention import LinearAngularAttention, SoftmaxAttention
from castling_det.modeling.backbone import Mlp
from castling_det.modeling.fused_linear import cpu_fused_linear, cpu_fused_linear_applies

# On the tests that run the op itself; the dispatch checks below it run everywhere.
needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="needs a PyTorch CPU build with oneDNN and a CPU with bf16 support",
)


def _mlp(approximate="none"):
    torch.manual_seed(0)
    mlp = Mlp(dim=64, hidden_dim=256).eval()
    mlp.act = nn.GELU(approximate=approximate)
    return mlp


def _exact_from_bf16(linear, x, act=None):
    """fp32 arithmetic on the bf16-rounded inputs: what the fused op may differ by is the one
    rounding of its output."""
    with torch.no_grad():
        bias = None if linear.bias is None else linear.bias.bfloat16().float()
        out = nn.functional.linear(x.bfloat16().float(), linear.weight.bfloat16().float(), bias)
    return out if act is None else act(out)


@needs_onednn_bf16
@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_is_the_plain_ops_rounded_once_under_bf16_autocast(approximate, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 256, bias=bias).eval()
    act = None if approximate is None else nn.GELU(approximate=approximate)
    x = torch.randn(2, 5, 7, 64)  # (B, H, W, C) tokens, as the blocks pass them
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert cpu_fused_linear_applies(x, linear)
        fused = cpu_fused_linear(x, linear, approximate)
        plain = linear(x) if act is None else act(linear(x))
    assert fused.dtype == torch.bfloat16 and fused.shape == (2, 5, 7, 256)
    exact = _exact_from_bf16(linear, x, act)
    assert ((fused.float() - exact).abs() <= 2**-8 * exact.abs() + 1e-4).all()
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)


@needs_onednn_bf16
@pytest.mark.parametrize("attention", [LinearAngularAttention, SoftmaxAttention])
def test_attention_projections_match_the_plain_ops_under_bf16_autocast(attention):
    torch.manual_seed(0)
    fused = attention(dim=64, num_heads=4).eval()
    plain = attention(dim=64, num_heads=4, fused=False).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1, 6, 5, 64)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        out, expected = fused(x), plain(x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=3e-2, atol=3e-2)


@needs_onednn_bf16
def test_linear_layers_take_the_fused_op_only_for_bf16_inference_on_cpu(monkeypatch):
    mlp = _mlp()
    attn = SoftmaxAttention(dim=64, num_heads=4).eval()
    calls = []
    real = fused_linear.cpu_fused_linear
    monkeypatch.setattr(fused_linear, "cpu_fused_linear", lambda *args: calls.append(args[2]) or real(*args))
    x = torch.randn(1, 3, 3, 64)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        mlp(x)
        attn(x)
    assert calls == ["none", None, None, None]  # fc1 with its GELU, fc2, qkv, proj
    with torch.inference_mode():
        mlp(x)  # fp32: oneDNN's fused op measured no faster there
    mlp.train()
    with torch.autocast("cpu", torch.bfloat16):
        out = mlp(x)  # training: the op has no backward
    out.float().sum().backward()
    assert mlp.fc1.weight.grad is not None and mlp.fc2.weight.grad is not None
    assert len(calls) == 4
    unfused = Mlp(dim=64, hidden_dim=256, fused=False).eval()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        unfused(x)
    assert len(calls) == 4


def test_fused_path_is_skipped_while_tracing():
    mlp = _mlp()
    x = torch.randn(1, 2, 2, 64)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        traced = torch.jit.trace(mlp, x, check_trace=False)
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    assert "gelu" in str(traced.inlined_graph)


def test_no_layer_takes_the_fused_op_without_onednn_bf16(monkeypatch):
    """Where oneDNN has no bf16 kernels (CPUs without AVX-512 bf16 or AMX), bf16 inference keeps
    the plain ops."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    calls = []
    monkeypatch.setattr(fused_linear, "cpu_fused_linear", lambda *args: calls.append(args))
    mlp, attn = _mlp(), SoftmaxAttention(dim=64, num_heads=4).eval()
    x = torch.randn(1, 3, 3, 64)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert not cpu_fused_linear_applies(x, mlp.fc1)
        out = attn(mlp(x))
    assert calls == [] and out.shape == x.shape
