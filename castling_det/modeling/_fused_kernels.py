"""Triton kernels of the fused, deployed linear-angular attention (see ``fused_attention.py``).

Both kernels index q, k, v through their four strides, so the strided views that the qkv
projection's permute returns are read in place, with no ``.contiguous()`` copy (a full pass over
the tensor). All arithmetic is in fp32 whatever the input dtype; the inputs are read once in their
own dtype and the output is rounded once, when it is stored.

With ``TRITON_INTERPRET=1`` in the environment when Triton is first imported, ``triton.jit``
(here and in Triton's own ``triton.language``) gives interpreted functions that run on CPU
tensors: that is how the tests run these kernels without a GPU.
"""
import math

import triton
import triton.language as tl

__all__ = ["linear_angular_tail", "linear_kv_partials"]

_INV_PI = tl.constexpr(1.0 / math.pi)

# Sizes are runtime values; telling Triton not to specialise on them (it would otherwise compile
# separate variants for a size equal to 1 or divisible by 16) keeps one compiled kernel per
# (dtype, head_dim, convolution, block sizes) whatever the image size. Strides keep their
# specialisation: their divisibility by 16 is what lets the loads vectorise.
_KV_SIZES = ["heads", "num_tokens", "tokens_per_split"]
_TAIL_SIZES = ["heads", "num_tokens", "height", "width"]


@triton.jit
def _load_rows(base, rows, row_mask, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of the ``(N, d)`` matrix at ``base`` (strides ``stride_n``, ``stride_d``)
    as an fp32 ``(len(rows), d)`` tile, zero where ``row_mask`` is False."""
    cols = tl.arange(0, HEAD_DIM)
    pointers = base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(pointers, mask=row_mask[:, None], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=_KV_SIZES)
def linear_kv_partials(
    k_ptr, v_ptr, partial_ptr,
    heads, num_tokens, tokens_per_split, eps,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One split of N of one (batch, head): ``Σ_n k̂_n ⊗ v_n`` over its tokens, in fp32.

    Program ``(bh, s)`` reads tokens ``[s·tokens_per_split, (s+1)·tokens_per_split) ∩ [0, N)``
    of k and v and writes its ``d × d`` partial sum to ``partial[bh, s]``; the splits are summed
    afterwards (split-K: the (B·heads) products alone are too few programs to fill a GPU).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = (bh // heads).to(tl.int64)
    head = (bh % heads).to(tl.int64)
    k_base = k_ptr + batch * k_stride_b + head * k_stride_h
    v_base = v_ptr + batch * v_stride_b + head * v_stride_h
    cols = tl.arange(0, HEAD_DIM)

    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, num_tokens)
    kv = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)
    for offset in range(0, tokens_per_split, BLOCK_N):
        rows = split_start + offset + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, rows, rows < split_end, k_stride_n, k_stride_d, HEAD_DIM)
        v = _load_rows(v_base, rows, rows < split_end, v_stride_n, v_stride_d, HEAD_DIM)
        # k̂ = k / max(‖k‖, eps), as F.normalize; masked rows are zero and add nothing.
        k_norm = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)
        kv = tl.dot(tl.trans(k / k_norm[:, None]), v, kv, input_precision=DOT_PRECISION)

    partial = partial_ptr + (bh * tl.num_programs(1) + split).to(tl.int64) * HEAD_DIM * HEAD_DIM
    tl.store(partial + cols[:, None] * HEAD_DIM + cols[None, :], kv)


@triton.jit(do_not_specialize=_TAIL_SIZES)
def linear_angular_tail(
    q_ptr, v_ptr, kv_ptr, linear_weight_ptr, conv_weight_ptr, out_ptr,
    heads, num_tokens, height, width, eps,
    q_stride_b, q_stride_h, q_stride_n, q_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, KERNEL_SIZE: tl.constexpr,
    GRID_CONV: tl.constexpr, HAS_LINEAR_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
):
    """``BLOCK_M`` tokens of one (batch, head): everything after k̂ᵀv, in one pass.

    ``out = normalize(w/π · q̂(k̂ᵀv) + 0.5·v) + DWConv(v)`` with ``q̂(k̂ᵀv)`` computed as
    ``(q·kv) / max(‖q‖, eps)`` (the same number: q is never normalised as a tile), the
    convolution gathered from v's neighbouring tokens: ``GRID_CONV`` False, the ``(k × 1)`` filter
    of the head along the token sequence; True, each channel's ``k × k`` filter over the
    ``height × width`` token grid. The neighbours' rows overlap the adjacent programs' tiles, so
    these loads are served mostly from cache: v still costs about one pass from memory.
    ``out`` is a contiguous ``(B, heads, N, d)`` tensor in v's dtype.

    ``ROUND_BF16_BY_BITS`` (for Triton's interpreter, whose fp32 → bf16 conversion truncates)
    rounds the fp32 output to the nearest bf16, ties to even, on its bits before the store, as
    the GPU's conversion does by itself.
    """
    block = tl.program_id(0)
    bh = tl.program_id(1)
    batch = (bh // heads).to(tl.int64)
    head = bh % heads
    q_base = q_ptr + batch * q_stride_b + head.to(tl.int64) * q_stride_h
    v_base = v_ptr + batch * v_stride_b + head.to(tl.int64) * v_stride_h
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_tokens
    cols = tl.arange(0, HEAD_DIM)

    q = _load_rows(q_base, rows, row_ok, q_stride_n, q_stride_d, HEAD_DIM)
    v = _load_rows(v_base, rows, row_ok, v_stride_n, v_stride_d, HEAD_DIM)
    kv_base = kv_ptr + bh.to(tl.int64) * HEAD_DIM * HEAD_DIM
    kv = tl.load(kv_base + cols[:, None] * HEAD_DIM + cols[None, :])

    q_norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)
    linear = tl.dot(q, kv, input_precision=DOT_PRECISION) / q_norm[:, None] * _INV_PI
    if HAS_LINEAR_WEIGHT:
        linear = linear * tl.load(linear_weight_ptr + head).to(tl.float32)
    total = linear + 0.5 * v
    out = total / tl.maximum(tl.sqrt(tl.sum(total * total, axis=1)), eps)[:, None]

    pad: tl.constexpr = KERNEL_SIZE // 2
    if GRID_CONV:
        # Token n sits at (n // width, n % width); its neighbour (r + a - pad, c + b - pad) is
        # token n + (a - pad)·width + (b - pad), taken only inside the grid (zero padding).
        grid_row = rows // width
        grid_col = rows % width
        channel_taps = conv_weight_ptr + (head * HEAD_DIM + cols) * (KERNEL_SIZE * KERNEL_SIZE)
        for a in tl.static_range(KERNEL_SIZE):
            for b in tl.static_range(KERNEL_SIZE):
                src_row = grid_row + (a - pad)
                src_col = grid_col + (b - pad)
                inside = (src_row >= 0) & (src_row < height) & (src_col >= 0) & (src_col < width)
                src = rows + (a - pad) * width + (b - pad)
                neighbour = _load_rows(
                    v_base, src, row_ok & inside, v_stride_n, v_stride_d, HEAD_DIM
                )
                tap = tl.load(channel_taps + (a * KERNEL_SIZE + b)).to(tl.float32)
                out += neighbour * tap[None, :]
    else:
        # One filter per head along the flattened sequence, zero outside [0, N).
        for j in tl.static_range(KERNEL_SIZE):
            src = rows + (j - pad)
            inside = (src >= 0) & (src < num_tokens)
            neighbour = _load_rows(v_base, src, row_ok & inside, v_stride_n, v_stride_d, HEAD_DIM)
            out += neighbour * tl.load(conv_weight_ptr + head * KERNEL_SIZE + j).to(tl.float32)

    if ROUND_BF16_BY_BITS:
        bits = out.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # carries into bit 16 past the halfway point
        out = ((bits >> 16) << 16).to(tl.float32, bitcast=True)  # now exact in bf16
    out_base = out_ptr + bh.to(tl.int64) * num_tokens * HEAD_DIM  # contiguous (B, heads, N, d)
    out_pointers = out_base + rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    tl.store(out_pointers, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

