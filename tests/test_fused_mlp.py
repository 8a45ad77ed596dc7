"""The MLP's fc1 + GELU fused into one oneDNN call for bf16 inference on CPU."""
import pytest
import torch
from torch import nn

from castling_det.modeling import fused_mlp
from castling_det.modeling.backbone import Mlp
from castling_det.modeling.fused_mlp import cpu_linear_gelu, cpu_linear_gelu_applies

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="needs a PyTorch CPU build with oneDNN and a CPU with bf16 support",
)


def _mlp(approximate="none"):
    torch.manual_seed(0)
    mlp = Mlp(dim=64, hidden_dim=256).eval()
    mlp.act = nn.GELU(approximate=approximate)
    return mlp


def _unfused(mlp, x):
    return mlp.fc2(mlp.act(mlp.fc1(x)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_fc1_gelu_matches_the_plain_ops_under_bf16_autocast(approximate):
    mlp = _mlp(approximate)
    x = torch.randn(2, 5, 7, 64)  # (B, H, W, C) tokens, as the blocks pass them
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert cpu_linear_gelu_applies(x, mlp.fc1)
        fused = cpu_linear_gelu(x, mlp.fc1, mlp.act)
        reference = mlp.act(mlp.fc1(x))
        out, expected = mlp(x), _unfused(mlp, x)
    assert fused.dtype == torch.bfloat16 and fused.shape == (2, 5, 7, 256)
    # fp32 arithmetic on the bf16-rounded inputs: what is left is the one rounding of the output.
    with torch.no_grad():
        as_bf16 = [t.bfloat16().float() for t in (x, mlp.fc1.weight, mlp.fc1.bias)]
        exact = mlp.act(nn.functional.linear(*as_bf16))
    assert ((fused.float() - exact).abs() <= 2**-8 * exact.abs() + 1e-4).all()
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_mlp_takes_the_fused_op_only_for_bf16_inference_on_cpu(monkeypatch):
    mlp = _mlp()
    calls = []
    real = fused_mlp.cpu_linear_gelu
    monkeypatch.setattr(
        "castling_det.modeling.backbone.cpu_linear_gelu",
        lambda *args: calls.append(1) or real(*args),
    )
    x = torch.randn(1, 3, 3, 64)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        mlp(x)
    assert len(calls) == 1
    with torch.inference_mode():
        mlp(x)  # fp32: oneDNN's fused op measured no faster there
    mlp.train()
    with torch.autocast("cpu", torch.bfloat16):
        out = mlp(x)  # training: the op has no backward
    out.float().sum().backward()
    assert mlp.fc1.weight.grad is not None
    assert len(calls) == 1


def test_fused_path_is_skipped_while_tracing():
    mlp = _mlp()
    x = torch.randn(1, 2, 2, 64)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        traced = torch.jit.trace(mlp, x, check_trace=False)
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    assert "gelu" in str(traced.inlined_graph)
