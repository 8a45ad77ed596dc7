"""The deployed linear-angular attention on CPU as one native operator
(``csrc/linear_angular_cpu.cpp``), compiled on first use with PyTorch's C++ extension loader.

Same computation and numerics as
:func:`~castling_det.modeling.blocked_attention.blocked_linear_angular_attention` (every
product in fp32, the output rounded once), with the elementwise tail of each token done in one
loop instead of a dozen tensor operations per block, and the qkv projection's output read in
one sequential sweep per pass (all heads of a token together) instead of head by head. Built for
this machine's instruction set (``-march=native``) into a folder named after it; where no C++
compiler is found the build fails once, a warning says why, and the blocked operator runs
instead.
"""
import functools
import hashlib
import logging
import os
import platform
from typing import Optional

import torch

from .blocked_attention import _grid_conv_channels_last

__all__ = ["native_attention_available", "native_linear_angular_attention"]

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "linear_angular_cpu.cpp")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tokens per block (all heads of each): fewer blocks make fewer GEMM calls. In the operator
# benchmark (ViT-B, N = 4096, fp32, 2-core Xeon, GEMMs through at::mm) 256 took 1.31x the two
# matmuls, 128 1.40x; a block of 256 is 2.4 MB of the qkv projection and 0.8 MB per fp32
# scratch block.
_BLOCK_TOKENS = 256


def _machine_key() -> str:
    """A short hash of this CPU's model and flags: a build for one machine type is never loaded
    on another (``-march=native``) when the extension folder is shared."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text += "".join(line for line in cpuinfo if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    """Compile (or reuse) and load the operator; False, with one warning, if that fails."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=f"castling_det_cpu_{_machine_key()}",
            sources=[_SOURCE],
            # -fopenmp: at::parallel_for is inline; compiled without it, it runs on one thread.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the blocked path runs
        logger.warning("castling_det: the native CPU attention operator did not build (%s); "
                       "the blocked operator runs instead", error)
        return False
    return True


def native_attention_available(q: torch.Tensor) -> bool:
    """Whether :func:`native_linear_angular_attention` can run for q (and its k, v): a CPU
    tensor ``(B, heads, N, d)`` in fp32, bf16 or fp16 with tokens and a unit last stride, no
    tracer or compiler looking, and the operator built (compiled on the first call that asks)."""
    return (
        q.device.type == "cpu"
        and q.dim() == 4
        and q.dtype in _DTYPES
        and q.shape[2] > 0
        and q.stride(-1) == 1
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and _load()
    )


def native_linear_angular_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    *,
    conv_kind: str,
    height: int,
    width: int,
    linear_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    block_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Linear-angular attention with the branch off (``block_tokens``: tokens per block, by default
    256); arguments and result as
    :func:`~castling_det.modeling.blocked_attention.blocked_linear_angular_attention`'s
    (``(B, heads, N, d)`` in v's dtype, a view of a contiguous ``(B, N, heads, d)`` tensor)."""
    batch, heads, num_tokens, head_dim = q.shape
    if conv_kind == "seq":
        taps = conv_weight.reshape(heads, -1).float().contiguous()  # one 1D filter per head
        out = torch.empty(batch, num_tokens, heads, head_dim, dtype=v.dtype)
    else:
        taps = torch.empty(heads, 0)  # no taps: the grid convolution is already in ``out``
        out = _grid_conv_channels_last(v, conv_weight, height, width)
    weight = None if linear_weight is None else linear_weight.reshape(heads).float()
    block = block_tokens or _BLOCK_TOKENS
    torch.ops.castling_det_cpu.linear_angular_attention(
        q, k, v, taps, weight, eps, block, conv_kind != "seq", out
    )
    return out.transpose(1, 2)
