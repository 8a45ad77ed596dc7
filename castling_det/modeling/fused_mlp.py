"""The MLP's first linear layer and its GELU as one oneDNN call, for bf16 inference on CPU.

In a bf16 forward on CPU, ``gelu(fc1(x))`` is three passes over the ``(N, 4·C)`` hidden
activations: ``addmm`` first copies the broadcast bias into its output, the GEMM accumulates into
it, and the GELU reads and writes it again. oneDNN applies the bias and the GELU to each output
tile while it is still in cache (its "post-ops"), so the hidden activations are written once.
PyTorch exposes that as ``torch.ops.mkldnn._linear_pointwise``, the op its own compiler
(Inductor) emits for the same pattern on CPU; here it is called directly in eager mode.
"""
import torch
from torch import nn

__all__ = ["cpu_linear_gelu_applies", "cpu_linear_gelu"]


def _cpu_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU linear layer computes ``x`` in: autocast's, when CPU autocast is on."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def cpu_linear_gelu_applies(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether :func:`cpu_linear_gelu` should replace ``act(linear(x))``: a CPU tensor computed
    in bf16 (autocast's or its own), a bias, no gradient to record (the op has no backward),
    and no tracer or compiler looking (they record, and fuse, the plain ops themselves)."""
    return (
        x.device.type == "cpu"
        and _cpu_compute_dtype(x) == torch.bfloat16
        and linear.bias is not None
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def cpu_linear_gelu(x: torch.Tensor, linear: nn.Linear, act: nn.GELU) -> torch.Tensor:
    """``act(linear(x))`` in bf16, bias and GELU applied inside oneDNN's GEMM; ``x`` of any
    number of leading dimensions. Call it where :func:`cpu_linear_gelu_applies`."""
    dtype = torch.bfloat16
    return torch.ops.mkldnn._linear_pointwise(
        x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype), "gelu", [], act.approximate
    )
