"""Linear layers with their bias (and a GELU) inside oneDNN's GEMM, for bf16 inference on CPU.

In a bf16 forward on CPU, ``nn.Linear`` is ``addmm``: it first copies the broadcast bias into
its output, then the GEMM accumulates into it, a pass over the output the GEMM did not need; a
GELU after it reads and writes the output again. oneDNN applies the bias and the GELU to each
output tile while it is still in cache (its "post-ops"), so the output is written once. PyTorch
exposes that as ``torch.ops.mkldnn._linear_pointwise``, the op its own compiler (Inductor) emits
for these patterns on CPU; here it is called directly in eager mode. In fp32 it measured no faster
than ``addmm``, so only bf16 takes it.
"""
from typing import Optional

import torch
from torch import nn

__all__ = ["cpu_fused_linear_applies", "cpu_fused_linear", "linear_forward"]


def _cpu_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU linear layer computes ``x`` in: autocast's, when CPU autocast is on."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def cpu_fused_linear_applies(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether :func:`cpu_fused_linear` should replace ``linear(x)``: a CPU tensor computed in
    bf16 (autocast's or its own), no gradient to record (the op has no backward), and no tracer or
    compiler looking (they record, and fuse, the plain ops themselves)."""
    return (
        x.device.type == "cpu"
        and _cpu_compute_dtype(x) == torch.bfloat16
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def cpu_fused_linear(x: torch.Tensor, linear: nn.Linear, gelu: Optional[str] = None) -> torch.Tensor:
    """``linear(x)`` in bf16, the bias applied inside oneDNN's GEMM, then ``GELU(approximate=gelu)``
    in the same call when ``gelu`` is given (``"none"`` or ``"tanh"``); ``x`` of any number of
    leading dimensions. Call it where :func:`cpu_fused_linear_applies`."""
    dtype = torch.bfloat16
    bias = None if linear.bias is None else linear.bias.to(dtype)
    attr, algorithm = ("none", "") if gelu is None else ("gelu", gelu)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), linear.weight.to(dtype), bias, attr, [], algorithm)


def linear_forward(x: torch.Tensor, linear: nn.Linear, fused: bool, act: Optional[nn.GELU] = None) -> torch.Tensor:
    """``linear(x)``, or ``act(linear(x))`` when ``act`` is given, through :func:`cpu_fused_linear`
    when ``fused`` and it applies, else through the plain modules."""
    if fused and cpu_fused_linear_applies(x, linear):
        return cpu_fused_linear(x, linear, None if act is None else act.approximate)
    out = linear(x)
    return out if act is None else act(out)
