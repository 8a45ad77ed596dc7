"""Runs the fused attention's Triton kernels on CPU through Triton's interpreter, for
``test_fused_attention.py``.

Triton decides between compiling and interpreting when a function is decorated with
``triton.jit``, its own library included, so ``TRITON_INTERPRET=1`` must be set before Triton is
first imported: the tests run this script in a fresh process with it set (their own process
may have imported Triton already, through torch).

Usage: ``python fused_attention_cases.py CASES_JSON`` with a JSON list of case dicts (keys
below); prints one JSON object mapping each case's ``id`` to its measurements. On a machine with
a GPU the tests also call :func:`run_case` in their own process with ``device="cuda"``: the
compiled kernels need no interpreter.
"""
import copy
import json
import os
import sys

import torch

from castling_det.modeling import attention
from castling_det.modeling.attention import LinearAngularAttention
from castling_det.modeling.fused_attention import fused_linear_angular_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _module(case) -> LinearAngularAttention:
    """An eval-mode module of the case's shape with non-trivial convolution and linear weights."""
    module = LinearAngularAttention(
        dim=case["heads"] * case["head_dim"], num_heads=case["heads"], conv_kind=case["conv_kind"],
        conv_kernel_size=case["kernel_size"], learn_linear_weight=case["learned"],
        softmax_branch=False,
    ).eval()
    with torch.no_grad():
        module.dwconv.weight.normal_(0.0, 0.3)  # every tap distinct, so a misplaced one shows
        if module.linear_weight is not None:
            module.linear_weight.copy_(torch.linspace(0.5, 3.0, case["heads"]).view(-1, 1, 1))
    return module


def _tokens(case) -> torch.Tensor:
    """Input tokens ``(B, H, W, C)``: Gaussian, or nearly one token repeated (``aligned``), which
    makes k̂ᵀv about N times one token's product, past fp16's range at large N."""
    shape = (case["batch"], case["height"], case["width"], case["heads"] * case["head_dim"])
    if case.get("aligned"):
        base = 4.0 * torch.randn(1, 1, 1, shape[-1])
        x = base + 0.05 * torch.randn(shape)
    else:
        x = torch.randn(shape)
    if case.get("zero_tokens"):
        x[:, 0, :2] = 0.0
    return x


def _token_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-token relative error ``‖out − ref‖ / ‖ref‖`` over tokens, heads and batch."""
    diff = (out.double() - ref).norm(dim=-1)
    return (diff / ref.norm(dim=-1).clamp_min(1e-12)).max().item()


def _frobenius_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` over the whole output (as ``tools/benchmark.py accuracy``)."""
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_case(case) -> dict:
    torch.manual_seed(case.get("seed", 0))
    dtype, device = DTYPES[case["dtype"]], case.get("device", "cpu")
    module = _module(case).to(device)
    x = _tokens(case).to(device)
    height, width = case["height"], case["width"]
    with torch.no_grad():
        if case.get("zero_tokens"):
            module.qkv.bias.zero_()  # zero tokens then give q = k = v = 0 exactly
        module = module.to(dtype)
        module64 = copy.deepcopy(module).double()  # the same (rounded) weights
        q, k, v = module._project_qkv(x.to(dtype))  # strided views, as in the model
        # The float64 reference of the operator itself, from the same (rounded) q, k, v.
        ref = module64.attend(q.double(), k.double(), v.double(), height, width)
        module.fused = False
        eager = module.attend(q, k, v, height, width)
        if case.get("via_module"):
            module.fused = True
            available = attention.fused_attention_available
            attention.fused_attention_available = lambda tensor: True  # CPU tensors too
            try:
                fused = module.attend(q, k, v, height, width)
            finally:
                attention.fused_attention_available = available
        else:
            fused = fused_linear_angular_attention(
                q, k, v, module.dwconv.weight, conv_kind=case["conv_kind"], height=height,
                width=width, linear_weight=module.linear_weight, eps=module.eps,
                num_splits=case.get("num_splits"), block_n=case.get("block_n"),
                block_m=case.get("block_m"),
            )
    kv_bound = v.abs().amax(dim=(0, 1, 3)).double().sum().item()  # Σ_n max|v_n| ≥ |k̂ᵀv|
    return {
        "dtype_ok": fused.dtype == v.dtype and fused.shape == v.shape and fused.is_contiguous(),
        "finite": bool(torch.isfinite(fused).all()),
        "vs_eager_abs": (fused.double() - eager.double()).abs().max().item(),
        "vs_eager_token": _token_error(fused, eager.double()),
        "fused_error": _frobenius_error(fused, ref),
        "eager_error": _frobenius_error(eager, ref),
        "fused_token_error": _token_error(fused, ref),
        "kv_bound_over_fp16_max": kv_bound / torch.finfo(torch.float16).max,
    }


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 in the environment")
    print(json.dumps({case["id"]: run_case(case) for case in json.loads(sys.argv[1])}))
