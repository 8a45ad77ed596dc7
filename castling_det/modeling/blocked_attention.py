"""The deployed linear-angular attention on CPU, blocked over tokens.

With the softmax branch off, :class:`~castling_det.modeling.attention.LinearAngularAttention`
computes, per head,

    out = normalize(w/π · q̂ (k̂ᵀv) + 0.5·v) + DWConv(v)

The eager reference makes a dozen passes over full ``(B, heads, N, d)`` tensors, each a round trip
to memory, and runs the depthwise convolution in a layout oneDNN handles slowly. Here:

1. The convolution runs first, as one depthwise ``conv2d`` over v in channels-last layout (the
   layout oneDNN's depthwise kernels are fast in, and the one the projection leaves the tokens
   in: ``(B, N, heads·d)``); its output buffer becomes the operator's output.
2. ``k̂ᵀv`` (fp32, per head) is accumulated block by block: each block of k and v is copied to
   fp32 scratch once, k normalised in place there, and added in with ``baddbmm``.
3. Per block of queries, ``q·(w·k̂ᵀv) + (π/2)·‖q‖·v`` (the sum above times ``π·‖q‖``; the final
   normalisation is scale-free, so q is never normalised as a tensor), its normalisation, and
   the add into the convolution's output all work on scratch buffers that stay in cache.

So q and k are read once, v three times (into the convolution's channels-last copy, then once
per blocked pass) and the output written twice (by the convolution, then the add): the
intermediates never leave the cache. Every
product is fp32 (fp64 for fp64 inputs) whatever the input dtype, as in the eager reference; the
convolution runs in the input's dtype, as there.

Sizes are plain runtime integers: nothing is compiled, so a new image size costs nothing. The
output is ``(B, heads, N, d)`` as a view of a ``(B, N, heads, d)`` buffer, so the output
projection's ``transpose(1, 2).reshape`` needs no copy.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["blocked_attention_available", "blocked_linear_angular_attention"]

# Bytes of one fp32 scratch block (B · heads · tokens · d floats; three are live at once). Blocks
# from 256 to 1024 tokens of a ViT-B layer (0.75-3 MiB) ran fastest on a 2-core EPYC: smaller
# ones pay PyTorch's per-call overhead more often, larger ones leave the cache.
_BLOCK_BYTES = 1 << 20


def blocked_attention_available(q: torch.Tensor) -> bool:
    """Whether :func:`blocked_linear_angular_attention` should run for q (and its k, v): a
    floating-point CPU tensor ``(B, heads, N, d)`` with tokens, and no tracer or compiler
    looking (a trace would record its Python loop unrolled for one size; ``torch.compile`` has
    its own fused form). Branch and gradient conditions are the module's to check."""
    return (
        q.device.type == "cpu"
        and q.dim() == 4
        and q.is_floating_point()
        and q.shape[2] > 0
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


def _tokens_per_block(batch_heads: int, head_dim: int) -> int:
    """Tokens per block: ``_BLOCK_BYTES`` of fp32 scratch, at least 16 tokens."""
    return max(16, _BLOCK_BYTES // (4 * batch_heads * head_dim))


def _depthwise_conv_channels_last(
    v: torch.Tensor, conv_weight: torch.Tensor, conv_kind: str, height: int, width: int
) -> torch.Tensor:
    """The module's depthwise convolution of v ``(B, heads, N, d)``, returned as a new
    contiguous ``(B, N, heads, d)`` tensor in v's dtype.

    ``"seq"`` (a ``k × 1`` filter per head along the token sequence) is the same depthwise
    convolution over a ``N × 1`` image with ``heads · d`` channels, each head's filter repeated
    over its d channels; ``"grid"`` is one over the ``height × width`` token grid."""
    batch, heads, num_tokens, head_dim = v.shape
    channels = heads * head_dim
    tokens = v.transpose(1, 2).reshape(batch, num_tokens, channels)
    if conv_kind == "seq":
        weight = conv_weight.repeat_interleave(head_dim, dim=0)  # (heads·d, 1, k, 1)
        image = tokens.view(batch, num_tokens, 1, channels)
    else:
        weight = conv_weight
        image = tokens.view(batch, height, width, channels)
    # (B, C, H, W) with channels-last strides: the projection's layout, copied only to drop
    # the q and k columns that sit between tokens.
    image = image.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    out = F.conv2d(image, weight.to(v.dtype), padding=padding, groups=channels)
    return out.permute(0, 2, 3, 1).reshape(batch, num_tokens, heads, head_dim)


def blocked_linear_angular_attention(
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
    """Linear-angular attention with the branch off, in blocks of tokens; equal to
    :class:`~castling_det.modeling.attention.LinearAngularAttention`'s eager output (before the
    output projection) up to rounding. Inference only: no gradient flows through the scratch
    buffers.

    Args:
        q, k, v: ``(B, heads, N, d)`` on the CPU, with ``N = height · width``.
        conv_weight: weight of the module's depthwise convolution.
        conv_kind, eps: as in the module (every norm clamped at ``eps``, as there).
        height, width: the token grid.
        linear_weight: the module's learned per-head weight of the linear term,
            ``(heads, 1, 1)``, or None (a weight of 1).
        block_tokens: tokens per block (default: fp32 scratch blocks of 1 MiB).

    Returns:
        ``(B, heads, N, d)`` in v's dtype, a view of a contiguous ``(B, N, heads, d)`` tensor.
    """
    batch, heads, num_tokens, head_dim = q.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    batch_heads = batch * heads
    block = block_tokens or _tokens_per_block(batch_heads, head_dim)
    blocks = [(start, min(block, num_tokens - start)) for start in range(0, num_tokens, block)]
    out = _depthwise_conv_channels_last(v, conv_weight, conv_kind, height, width)

    # Flat scratch: a block of any size is a contiguous view of its first elements.
    scratch = [torch.empty(batch_heads * block * head_dim, dtype=acc) for _ in range(3)]

    def blocks_of(*sources, start, size):
        shape = (batch, heads, size, head_dim)
        views = [buffer[:batch_heads * size * head_dim].view(shape) for buffer in scratch]
        for view, source in zip(views, sources):
            view.copy_(source[:, :, start:start + size])
        return views

    kv = torch.zeros(batch_heads, head_dim, head_dim, dtype=acc)
    for start, size in blocks:
        k_block, v_block, _ = blocks_of(k, v, start=start, size=size)
        k_block.div_(torch.linalg.vector_norm(k_block, dim=-1, keepdim=True).clamp_min_(eps))
        kv.baddbmm_(k_block.view(batch_heads, size, head_dim).transpose(1, 2),
                    v_block.view(batch_heads, size, head_dim))
    if linear_weight is not None:
        kv.view(batch, heads, head_dim, head_dim).mul_(linear_weight.to(acc))

    # q·(w·k̂ᵀv) + (π/2)·‖q‖·v is π·‖q‖ times the module's sum w/π·q̂(k̂ᵀv) + 0.5·v, with ‖q‖
    # clamped at eps as q̂'s is: the normalisation's clamp scales by π·‖q‖ with it.
    for start, size in blocks:
        q_block, v_block, total = blocks_of(q, v, start=start, size=size)
        torch.bmm(q_block.view(batch_heads, size, head_dim), kv, out=total.view(batch_heads, size, head_dim))
        q_norm = torch.linalg.vector_norm(q_block, dim=-1, keepdim=True).clamp_min_(eps)
        total.addcmul_(q_norm, v_block, value=math.pi / 2)
        total_norm = torch.linalg.vector_norm(total, dim=-1, keepdim=True)
        total.div_(torch.maximum(total_norm, q_norm.mul_(math.pi * eps)))
        out[:, start:start + size].add_(total.transpose(1, 2))
    return out.transpose(1, 2)
