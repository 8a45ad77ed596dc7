"""The deployed linear-angular attention as two Triton kernels.

With the softmax branch off, :class:`~castling_det.modeling.attention.LinearAngularAttention`
computes, per head,

    out = normalize(w/π · q̂ (k̂ᵀv) + 0.5·v) + DWConv(v)

The eager reference spends more than a dozen passes over ``(B, heads, N, d)`` tensors on this
(casts, normalised copies of q and k, the matmul outputs, the sum, its normalisation, the
convolution and the final add). Here it takes two kernels and a tiny reduction:

1. ``linear_kv_partials``: k̂ᵀv, ``(d × d)`` per head, accumulated in fp32 from k and v read once.
   The sum over N is split across programs (split-K): one program per (batch·head) alone would
   run a dozen programs on a GPU with a hundred and more multiprocessors. Each split writes its
   own fp32 partial and ``torch.sum`` adds the splits, rather than atomic adds into one buffer:
   the result is then the same bit for bit on every run, and the cost is the same one extra
   launch (the atomics would need a zero-filled buffer first) over a buffer of
   ``B·heads·splits·d²`` floats, small next to q, k or v.
2. ``linear_angular_tail``: per block of tokens, reads q and v once, computes ``q·(k̂ᵀv)`` with
   the fp32 k̂ᵀv, ``‖q‖``, the sum with ``0.5·v``, its normalisation and the depthwise convolution
   (both ``"seq"`` and ``"grid"``, from v's neighbouring rows, which sit in cache), and writes the
   output once in v's dtype.

So q, k and v are read once each, v twice (once per kernel) and the output written once: five
passes, the least that the dependency of every output on all of k̂ᵀv allows.

Numerics: everything is fp32 whatever the input dtype (k̂ᵀv, a sum over N tokens, cannot overflow
fp16), both products included: ``tl.dot`` gets fp32 operands, multiplied to about fp32 accuracy
(see :func:`_dot_precision`), never rounded to TF32 or to the input's dtype, as in the eager path
with PyTorch's default (TF32 off for matmuls). The output is rounded once, so its error against
float64 is at most the eager path's (which rounds the normalised sum and the convolution
separately before adding them).

Every size (B, heads, N, height, width) reaches the kernels as a runtime integer, excluded from
Triton's specialisation of integer arguments (on being 1 or a multiple of 16): a new image size
compiles nothing. Kernels are compiled per input dtype, head dimension, convolution kind and
size, and whether a learned linear weight is present; the strides keep their specialisation
(it lets loads vectorise), so an input whose batch stride changes divisibility by 16 may add one
variant.

On CUDA tensors the kernels are compiled. CPU tensors run through Triton's interpreter, which is
slow and meant for the tests: it needs ``TRITON_INTERPRET=1`` in the environment before Triton is
first imported (Triton's own library functions are decorated then).
:func:`fused_attention_available` tells whether the fused path applies to a tensor; the module
falls back to its eager reference when it does not.
"""
import contextlib
import functools
import importlib.util
from typing import Optional

import torch

__all__ = [
    "FUSED_DTYPES",
    "FUSED_HEAD_DIMS",
    "fused_attention_available",
    "fused_kernel_supports",
    "fused_linear_angular_attention",
    "triton_importable",
]

FUSED_HEAD_DIMS = (16, 32, 64, 128)  # powers of two: tl.arange and tl.dot need them (and ≥ 16)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A split of N below this many tokens would spend more on writing its d×d partial than on reading.
_MIN_TOKENS_PER_SPLIT = 256
# A CUDA grid's second axis (the (batch, head) pairs of the tail kernel) holds at most this many.
_MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def fused_kernel_supports(q: torch.Tensor) -> bool:
    """Whether the kernels handle q's dtype and shape ``(B, heads, N, d)``, on any device."""
    return (
        q.dim() == 4
        and q.dtype in FUSED_DTYPES
        and q.shape[-1] in FUSED_HEAD_DIMS
        and q.shape[2] > 0
        and 0 < q.shape[0] * q.shape[1] <= _MAX_GRID_Y
    )


def fused_attention_available(q: torch.Tensor) -> bool:
    """Whether :func:`fused_linear_angular_attention` should run for q (and its k, v): a CUDA
    tensor the kernels support, Triton installed, and no tracer or compiler looking (a Triton
    launch cannot be traced by ``torch.jit.trace`` for export, and ``torch.compile`` has its own
    fused form). Branch and gradient conditions are the module's to check."""
    return (
        q.is_cuda
        and fused_kernel_supports(q)
        and triton_importable()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


def _launch_config(head_dim: int):
    """``(tokens per tile, warps per program)`` by head dimension, the same for both kernels.

    Chosen from ptxas's register report for sm_90 (no GPU timing behind them yet): the largest
    tiles whose kernels, in every dtype and both convolutions, spill no or few registers. The
    tail holds the q, v and output tiles, the fp32 k̂ᵀv operand and the convolution's shifted
    loads at once, so its tiles stay small.
    """
    return {16: (64, 4), 32: (32, 4), 64: (32, 8), 128: (16, 8)}[head_dim]


def _dot_precision(device: torch.device) -> str:
    """``input_precision`` of both ``tl.dot`` calls, whose operands are fp32: ``"tf32x3"`` on
    NVIDIA GPUs with TF32 tensor cores (compute capability ≥ 8.0), three TF32 products whose sum
    is about as accurate as an fp32 product, on the tensor cores; elsewhere ``"ieee"``, fp32
    multiply-adds (the interpreter computes every dot in fp32 whatever this says)."""
    if device.type == "cuda" and torch.version.hip is None:
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "tf32x3"
    return "ieee"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _default_splits(q: torch.Tensor, num_tokens: int, block_n: int) -> int:
    """Splits of N for the k̂ᵀv kernel: enough programs for two per multiprocessor, each split
    at least ``_MIN_TOKENS_PER_SPLIT`` tokens. On CPU (the interpreter) a fixed 4."""
    if q.is_cuda:
        target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        target = 4 * q.shape[0] * q.shape[1]
    per_head = _cdiv(target, q.shape[0] * q.shape[1])
    most = _cdiv(num_tokens, max(_MIN_TOKENS_PER_SPLIT, block_n))
    return max(1, min(per_head, most))


def fused_linear_angular_attention(
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
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
    block_m: Optional[int] = None,
) -> torch.Tensor:
    """Linear-angular attention with the branch off, fused; the same function as the eager
    :meth:`LinearAngularAttention.attend` in eval mode, up to rounding. Inference only: no
    gradient flows through it.

    Args:
        q, k, v: ``(B, heads, N, d)`` of one dtype among :data:`FUSED_DTYPES`, any strides,
            with ``N = height · width`` and d among :data:`FUSED_HEAD_DIMS`.
        conv_weight: the module's depthwise convolution weight: ``(heads, 1, k, 1)`` for
            ``conv_kind="seq"``, ``(heads·d, 1, k, k)`` for ``"grid"``.
        conv_kind: ``"seq"`` or ``"grid"``, as in the module.
        height, width: the token grid.
        linear_weight: the learned per-head weight of the linear term, ``(heads, 1, 1)``, or None
            (a weight of 1).
        eps: lower clamp of every L2 norm.
        num_splits: splits of N in the k̂ᵀv kernel (default: enough to fill the GPU).
        block_n, block_m: tokens per tile of the k̂ᵀv and of the tail kernel, powers of two
            ≥ 16 (defaults by head dimension; the tests raise them to keep the interpreter fast).

    Returns:
        ``(B, heads, N, d)``, contiguous, in v's dtype.
    """
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device):
        raise ValueError(
            "q, k, v must share shape, dtype and device, got "
            f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in (q, k, v)]}"
        )
    if not fused_kernel_supports(q):
        raise ValueError(
            f"the fused kernels take (B, heads, N, d) tensors of dtype in {FUSED_DTYPES} and d in "
            f"{FUSED_HEAD_DIMS}, got {tuple(q.shape)} {q.dtype}"
        )
    batch, heads, num_tokens, head_dim = q.shape
    if num_tokens != height * width:
        raise ValueError(f"N={num_tokens} tokens do not fill a {height}×{width} grid")
    if conv_kind not in ("seq", "grid"):
        raise ValueError(f"conv_kind={conv_kind!r} must be 'seq' or 'grid'")
    size = conv_weight.shape[-2]
    expected = (heads, 1, size, 1) if conv_kind == "seq" else (heads * head_dim, 1, size, size)
    if tuple(conv_weight.shape) != expected:
        raise ValueError(
            f"{conv_kind!r} conv weight must be {expected}, got {tuple(conv_weight.shape)}"
        )

    import triton  # only once the path is taken: importing Triton takes a while

    if not q.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            "the fused kernels run on CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before Triton is first imported"
        )
    from ._fused_kernels import linear_angular_tail, linear_kv_partials

    default_block, num_warps = _launch_config(head_dim)
    block_n, block_m = block_n or default_block, block_m or default_block
    if any(b < 16 or b & (b - 1) for b in (block_n, block_m)):
        raise ValueError(f"block_n={block_n}, block_m={block_m} must be powers of two ≥ 16")
    precision = _dot_precision(q.device)
    if num_splits is None:
        num_splits = _default_splits(q, num_tokens, block_n)
    # Whole blocks per split, so that only the last block of the last split is ragged.
    tokens_per_split = _cdiv(_cdiv(num_tokens, max(num_splits, 1)), block_n) * block_n
    num_splits = _cdiv(num_tokens, tokens_per_split)

    partials = torch.empty(
        batch * heads, num_splits, head_dim, head_dim, dtype=torch.float32, device=q.device
    )
    out = torch.empty(batch, heads, num_tokens, head_dim, dtype=v.dtype, device=v.device)
    conv_weight = conv_weight.detach().contiguous()
    weight = None if linear_weight is None else linear_weight.detach().reshape(heads).contiguous()
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        linear_kv_partials[(batch * heads, num_splits)](
            k, v, partials,
            heads, num_tokens, tokens_per_split, eps,
            *k.stride(), *v.stride(),
            HEAD_DIM=head_dim, BLOCK_N=block_n, DOT_PRECISION=precision, num_warps=num_warps,
        )
        kv = partials.sum(dim=1) if num_splits > 1 else partials
        linear_angular_tail[(_cdiv(num_tokens, block_m), batch * heads)](
            # Without a learned weight, conv_weight stands in for its pointer, never read.
            q, v, kv, weight if weight is not None else conv_weight, conv_weight, out,
            heads, num_tokens, height, width, eps,
            *q.stride(), *v.stride(),
            HEAD_DIM=head_dim, BLOCK_M=block_m, KERNEL_SIZE=size,
            GRID_CONV=conv_kind == "grid", HAS_LINEAR_WEIGHT=weight is not None,
            DOT_PRECISION=precision,
            ROUND_BF16_BY_BITS=not q.is_cuda and v.dtype == torch.bfloat16,
            num_warps=num_warps,
        )
    return out

