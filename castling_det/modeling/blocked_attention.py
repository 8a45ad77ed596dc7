"""The deployed linear-angular attention on CPU, blocked over tokens.

With the softmax branch off, :class:`~castling_det.modeling.attention.LinearAngularAttention`
computes, per head,

    out = normalize(w/π · q̂ (k̂ᵀv) + 0.5·v) + DWConv(v)

The eager reference makes a dozen passes over full ``(B, heads, N, d)`` tensors, each a round trip
to memory, and runs the depthwise convolution as a separate oneDNN call (in bf16 over a long token
sequence a slow one: it grew 25× from 4,096 to 16,384 tokens in a ViT-B profile). Here two passes
over blocks of tokens do all of it, on fp32 blocks that stay in cache:

1. ``k̂ᵀv`` (fp32, per head) is accumulated block by block: each block of k and v is copied to
   fp32 scratch once, k normalised in place there, and added in with a matmul.
2. Per block of queries, ``q·(w·k̂ᵀv) + (π/2)·‖q‖·v`` (the sum above times ``π·‖q‖``; the final
   normalisation is scale-free, so q is never normalised as a tensor) and its normalisation;
   then the ``"seq"`` convolution, k shifted multiply-adds of v's block and its ``k // 2``
   neighbouring tokens on either side (the halo), each head's tap a scalar; then one write of
   the block into the output.

So q and k are read once, v twice (once per pass, halo aside) and the output written once; the
intermediates never leave the cache. Every product is fp32 (fp64 for fp64 inputs) whatever the
input dtype, as in the eager reference, and the output is rounded once. The ``"grid"``
convolution (``k × k`` on the token grid, one filter per channel) would need k² multiply-adds a
block: it stays one channels-last depthwise ``conv2d`` (the layout oneDNN's kernels are fast in)
in the input's dtype, whose output the blocks are added into.

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


def _grid_conv_channels_last(
    v: torch.Tensor, conv_weight: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The ``"grid"`` depthwise ``k × k`` convolution of v ``(B, heads, N, d)`` over the token
    grid, returned as a new contiguous ``(B, N, heads, d)`` tensor in v's dtype."""
    batch, heads, num_tokens, head_dim = v.shape
    channels = heads * head_dim
    # (B, C, H, W) with channels-last strides: the projection's layout, copied only to drop
    # the q and k columns that sit between tokens.
    image = v.transpose(1, 2).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    image = image.contiguous(memory_format=torch.channels_last)
    padding = conv_weight.shape[-1] // 2
    out = F.conv2d(image, conv_weight.to(v.dtype), padding=padding, groups=channels)
    return out.permute(0, 2, 3, 1).reshape(batch, num_tokens, heads, head_dim)


class _Scratch:
    """Flat fp32 (or fp64) buffers, any of whose first elements is a contiguous block of any
    shape that fits: allocated once per call, reused by every block."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype):
        self.buffers = [torch.empty(numel, dtype=dtype) for _ in range(count)]

    def block(self, index: int, shape) -> torch.Tensor:
        """Buffer ``index`` viewed as a contiguous tensor of ``shape``."""
        return self.buffers[index][:math.prod(shape)].view(shape)

    def read(self, index: int, source: torch.Tensor) -> torch.Tensor:
        """``source`` copied (and cast) into buffer ``index``. Copied even when its dtype is
        the scratch's: on the projection's strided views (a token's head every 3·heads·d
        elements) the matmuls, norms and multiply-adds ran slower than on a contiguous copy
        (1.5-5× in one profile on a shared 2-core EPYC), and the copy costs about one in-cache pass."""
        return self.block(index, source.shape).copy_(source)


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
    block = block_tokens or _tokens_per_block(batch * heads, head_dim)
    blocks = [(start, min(block, num_tokens - start)) for start in range(0, num_tokens, block)]
    if conv_kind == "seq":
        pad = conv_weight.shape[2] // 2
        taps = conv_weight.reshape(1, heads, -1, 1).to(acc)  # tap j of head h: taps[:, h, j]
        out = torch.empty(batch, num_tokens, heads, head_dim, dtype=v.dtype)
    else:
        pad = 0
        out = _grid_conv_channels_last(v, conv_weight, height, width)
    scratch = _Scratch(3, batch * heads * (block + 2 * pad) * head_dim, acc)

    kv = torch.zeros(batch, heads, head_dim, head_dim, dtype=acc)
    for start, size in blocks:
        k_block = scratch.read(0, k[:, :, start:start + size])
        k_block.div_(torch.linalg.vector_norm(k_block, dim=-1, keepdim=True).clamp_min_(eps))
        kv += torch.matmul(k_block.transpose(-2, -1), scratch.read(1, v[:, :, start:start + size]))
    if linear_weight is not None:
        kv.mul_(linear_weight.to(acc))

    # q·(w·k̂ᵀv) + (π/2)·‖q‖·v is π·‖q‖ times the module's sum w/π·q̂(k̂ᵀv) + 0.5·v, with ‖q‖
    # clamped at eps as q̂'s is: the normalisation's clamp scales by π·‖q‖ with it.
    for start, size in blocks:
        end = start + size
        halo_start, halo_end = max(0, start - pad), min(num_tokens, end + pad)
        v_halo = scratch.read(1, v[:, :, halo_start:halo_end])
        v_block = v_halo[:, :, start - halo_start:end - halo_start]
        q_block = scratch.read(0, q[:, :, start:end])
        q_norm = torch.linalg.vector_norm(q_block, dim=-1, keepdim=True).clamp_min_(eps)
        total = torch.matmul(q_block, kv, out=scratch.block(2, q_block.shape))
        total.addcmul_(q_norm, v_block, value=math.pi / 2)
        total_norm = torch.linalg.vector_norm(total, dim=-1, keepdim=True)
        total.div_(torch.maximum(total_norm, q_norm.mul_(math.pi * eps)))
        if conv_kind == "seq":
            # Tap j reads token n + j - pad (zero outside the sequence), as nn.Conv2d does.
            for j in range(2 * pad + 1):
                shift = j - pad
                first, last = max(start, -shift), min(end, num_tokens - shift)
                if first < last:
                    source = v_halo[:, :, first + shift - halo_start:last + shift - halo_start]
                    total[:, :, first - start:last - start].addcmul_(source, taps[:, :, j:j + 1])
            out[:, start:end].copy_(total.transpose(1, 2))
        else:
            out[:, start:end].add_(total.transpose(1, 2))
    return out.transpose(1, 2)
