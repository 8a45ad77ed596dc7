"""Token mixers of a Castling-ViT block: linear-angular attention and its softmax twin.

Both take and return tokens laid out as an image, ``(B, H, W, C)``, like Detectron2's ViT, so the
same block can run them globally or inside windows and the grid convolution knows the token grid.
Every product is an explicit ``torch.matmul`` so that trace-based FLOP counters (fvcore) see it.
"""
import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocked_attention import blocked_attention_available, blocked_linear_angular_attention
from .fused_attention import fused_attention_available, fused_linear_angular_attention
from .native_attention import native_attention_available, native_linear_angular_attention
from .fused_linear import linear_forward

__all__ = [
    "BRANCH_MASKS",
    "CONV_KINDS",
    "LinearAngularAttention",
    "SoftmaxAttention",
    "branch_keep_mask",
    "deployed_linear_angular_attention",
    "masked_softmax_attention",
]

CONV_KINDS = ("seq", "grid")
BRANCH_MASKS = ("absolute", "relative", "topk")
# Dtypes whose range holds the deployed form's un-normalised intermediates.
_WIDE_RANGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def branch_keep_mask(attn: torch.Tensor, mask: str, threshold: float, topk: int) -> torch.Tensor:
    """Which softmax weights the branch keeps, as a boolean tensor of ``attn``'s shape.

    Args:
        attn: softmax weights ``(..., queries, N)``, each row summing to 1.
        mask: ``"absolute"``: the reference's ``A > threshold``; ``"relative"``: ``A ≥ threshold / N``,
            a threshold in units of the uniform weight, so that the mask means the same at any
            token count (a fresh model's near-uniform softmax keeps about half its weights at
            ``threshold = 1``, where an absolute 0.02 keeps none once N > 50); ``"topk"``: the
            ``topk`` largest weights of each row (ties at the k-th value kept too).
        threshold: the threshold of ``"absolute"`` and ``"relative"``.
        topk: k of ``"topk"`` (all N when N is smaller).
    """
    if mask == "absolute":
        return attn > threshold
    if mask == "relative":
        return attn >= threshold / attn.shape[-1]
    kth_largest = attn.topk(min(topk, attn.shape[-1]), dim=-1).values[..., -1:]
    return attn >= kth_largest


def _masked_softmax_chunk(
    q_chunk: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, mask: str, threshold: float, topk: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One query chunk of the branch: its output rows and the softmax mass its mask keeps."""
    attn = torch.matmul(q_chunk * q_chunk.shape[-1] ** -0.5, k_t).softmax(dim=-1)
    sparse = attn * branch_keep_mask(attn, mask, threshold, topk)
    return torch.matmul(sparse, v), sparse.sum()


def masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float,
    mask: str = "absolute",
    topk: int = 32,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary branch of Castling-ViT: ``(A ⊙ M) v`` with ``A = softmax(q kᵀ / √d)`` and the
    mask ``M`` of :func:`branch_keep_mask` (the reference: ``M = [A > threshold]``).

    Args:
        q, k, v: tensors of shape ``(B, heads, N, d)``; q and k are the *un-normalised* projections.
        threshold, mask, topk: which weights are kept (see :func:`branch_keep_mask`); the others
            are set to zero, not renormalised.
        chunk_size: if given, queries are processed ``chunk_size`` at a time. Every query row is
            independent, so chunking is exact. Each chunk is checkpointed when gradients are
            recorded (its scores are recomputed in the backward pass instead of kept), so the
            peak memory is ``chunk_size × N`` scores per head instead of ``N × N``, in training
            as in inference.

    Returns:
        The branch output, ``(B, heads, N, d)``, and the softmax mass the mask keeps, averaged over
        batch, heads and queries (a scalar in [0, 1], differentiable: what the L1 penalty shrinks).
    """
    k_t = k.transpose(-2, -1)
    if chunk_size is None:
        out, kept_mass = _masked_softmax_chunk(q, k_t, v, mask, threshold, topk)
        return out, kept_mass / q.shape[:-1].numel()
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outputs, kept_mass = [], 0.0
    for q_chunk in q.split(chunk_size, dim=-2):
        if recompute:
            out, kept = checkpoint(
                _masked_softmax_chunk, q_chunk, k_t, v, mask, threshold, topk, use_reentrant=False
            )
        else:
            out, kept = _masked_softmax_chunk(q_chunk, k_t, v, mask, threshold, topk)
        outputs.append(out)
        kept_mass = kept_mass + kept
    return torch.cat(outputs, dim=-2), kept_mass / q.shape[:-1].numel()


def _seq_conv_as_shifts(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ``"seq"`` depthwise convolution, ``(k × 1)`` along the tokens, as a sum of k shifted,
    weighted copies of v. Same result as ``F.conv2d``; written this way a compiler fuses it with
    the elementwise ops around it instead of calling a separate convolution kernel.
    """
    size, num_tokens = weight.shape[2], v.shape[-2]
    padded = F.pad(v, (0, 0, size // 2, size // 2))
    taps = weight.view(1, -1, size, 1)  # (1, heads, k, 1): one filter per head
    out = padded[:, :, :num_tokens] * taps[:, :, :1]
    for shift in range(1, size):
        out = out + padded[:, :, shift:shift + num_tokens] * taps[:, :, shift:shift + 1]
    return out


def _grid_conv(v: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The ``"grid"`` depthwise ``k × k`` convolution of v over the token grid, ``(B, heads, N, d)``
    in and out."""
    batch, heads, num_tokens, head_dim = v.shape
    channels = heads * head_dim
    # A (B, C, H, W) view with channels-last strides: oneDNN's depthwise kernels are several
    # times faster in that layout than in NCHW, forward and backward.
    grid = v.permute(0, 2, 1, 3).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    out = F.conv2d(grid, weight, padding=weight.shape[-1] // 2, groups=channels)
    return out.permute(0, 2, 3, 1).reshape(batch, num_tokens, heads, head_dim).transpose(1, 2)


def deployed_linear_angular_attention(
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
) -> torch.Tensor:
    """Linear-angular attention with the branch off, reordered to read each ``(B, h, N, d)``
    tensor as few times as possible; equal to :class:`LinearAngularAttention`'s output (before
    the output projection) up to rounding. Made for ``torch.compile``, which fuses it into two
    elementwise kernels around the two matmuls; in eager mode it is about as fast as the default.

    The reordering uses that the final normalisation is per token and scale-free: the sum
    ``(1/π)·q̂(k̂ᵀv) + 0.5·v`` is multiplied by ``π·‖q‖`` (and its eps clamp with it), so q is
    never normalised as a full tensor. Unlike the default path, the two matmuls run in the
    input's precision (that is the speed-up): in bf16 the output error is then about twice
    bf16's rounding, and q(k̂ᵀv), up to ``‖q‖·N·max|v|``, can overflow fp16, so fp16 inputs
    belong on the default path.

    Args:
        q, k, v: ``(B, heads, N, d)``, with ``N = height · width``.
        conv_weight: weight of the module's depthwise convolution.
        conv_kind, eps: as in :class:`LinearAngularAttention`.
        height, width: the token grid.
        linear_weight: the module's learned per-head weight of the linear term, ``(heads, 1, 1)``,
            or None (a weight of 1).

    Returns:
        ``(B, heads, N, d)``, in v's dtype.
    """
    acc = torch.promote_types(v.dtype, torch.float32)  # the elementwise tail: fp32 at least
    q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=acc).clamp_min(eps)
    k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=acc).clamp_min(eps)
    kv = torch.matmul((k / k_norm).to(k.dtype).transpose(-2, -1), v)  # k̂ᵀv, (B, h, d, d)
    linear_term = torch.matmul(q, kv).to(acc)
    if linear_weight is not None:
        linear_term = linear_term * linear_weight.to(acc)
    total = linear_term + (math.pi / 2) * q_norm * v.to(acc)
    total_norm = torch.linalg.vector_norm(total, dim=-1, keepdim=True).clamp_min(
        math.pi * eps * q_norm
    )
    if conv_kind == "seq":
        conv = _seq_conv_as_shifts(v, conv_weight)
    else:
        conv = _grid_conv(v, conv_weight, height, width)
    return (total / total_norm).to(v.dtype) + conv


class _MultiHeadAttention(nn.Module):
    """What every attention here shares: the q, k, v and output projections over heads."""

    def __init__(self, *, dim: int, num_heads: int = 8, qkv_bias: bool = True, fused: bool = True):
        """
        Args:
            dim: number of input and output channels.
            num_heads: number of attention heads; must divide ``dim``.
            qkv_bias: whether the q, k, v projection has a bias.
            fused: in bf16 inference on CPU, compute each projection in one oneDNN call, its bias
                inside the GEMM (:func:`~castling_det.modeling.fused_linear.cpu_fused_linear`).
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = fused

    def _project_qkv(self, x: torch.Tensor):
        """Tokens ``(B, H, W, C)`` to q, k, v of shape ``(B, heads, H·W, C / heads)`` each."""
        batch, height, width, _ = x.shape
        qkv = linear_forward(x, self.qkv, self.fused).reshape(batch, height * width, 3, self.num_heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _project_out(self, out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per-head outputs ``(B, heads, H·W, d)`` to projected tokens ``(B, H, W, C)``."""
        batch = out.shape[0]
        return linear_forward(out.transpose(1, 2).reshape(batch, height, width, -1), self.proj, self.fused)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens of shape ``(B, H, W, C)``.

        Returns:
            Tensor of shape ``(B, H, W, C)``.
        """
        height, width = x.shape[1:3]
        out = self.attend(*self._project_qkv(x), height, width)
        return self._project_out(out, height, width)


class LinearAngularAttention(_MultiHeadAttention):
    """Castling-ViT's linear-angular attention (You et al., CVPR 2023).

    Per head, with ``q̂ = q/‖q‖`` and ``k̂ = k/‖k‖``::

        out = normalize(0.5·v + (w/π)·q̂ (k̂ᵀ v) [+ branch]) + DWConv(v)

    which keeps the linear terms of the angular kernel ``1 − arccos(q̂·k̂)/π`` (``w = 1``, or a
    learned per-head weight of the linear term against the constant one); the depthwise
    convolution and, during training, a masked softmax attention (the *branch*) stand in for the
    high-order residual. With the branch off, cost and memory are linear in the number of tokens N:
    no N×N tensor is ever formed.

    The branch is added as ``branch_scale · (A ⊙ mask) v``; the training schedule lowers
    ``branch_scale`` to 0 (then the branch is not computed). It runs in training mode only, while
    ``softmax_branch`` is on: a module in eval mode is the deployed, linear one, however it was
    built, unless ``branch_at_inference`` is set too (as :func:`~castling_det.set_softmax_branch`
    and :func:`~castling_det.softmax_branch` do, to measure what the branch still contributes). In training mode each forward leaves
    ``branch_stats``: the kept softmax mass (differentiable) and the branch's share of the sum.

    Numerics: from bf16 or fp16 q, k, v, everything between the projections and the
    depthwise convolution (norms, both matmuls, the sum and its normalisation) runs in fp32, so
    ``k̂ᵀv``, a sum over N tokens, cannot overflow fp16, and the output's error is bf16's own
    rounding. Norms are clamped at ``eps`` so that an all-zero token gives zeros, not NaN.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        conv_kind: str = "seq",
        conv_kernel_size: int = 9,
        learn_linear_weight: bool = False,
        branch_mask: str = "absolute",
        branch_threshold: float = 0.02,
        branch_topk: int = 32,
        branch_as_sum: bool = False,
        branch_chunk_size: Optional[int] = 512,
        softmax_branch: bool = True,
        compile_tail: bool = False,
        fused: bool = True,
        eps: float = 1e-6,
    ):
        """
        Args:
            dim: number of input and output channels.
            num_heads: number of attention heads; must divide ``dim``.
            qkv_bias: whether the q, k, v projection has a bias.
            conv_kind: ``"seq"``: the reference's depthwise ``(k × 1)`` convolution along the
                flattened token sequence, one filter per head shared over the head's channels;
                ``"grid"``: a depthwise ``k × k`` convolution over the 2D token grid, one filter
                per channel.
            conv_kernel_size: k above; must be odd so the output keeps the token count.
            learn_linear_weight: learn a per-head weight ``w`` of the linear term ``q̂(k̂ᵀv)/π``
                against the constant ``0.5·v`` (starting at 1, the reference). Since the sum is
                normalised, a larger ``w`` gives sharper attention: the angular kernel alone
                spans only ``[0.18, 0.82]``.
            branch_mask: which softmax weights the branch keeps: ``"absolute"`` (the
                reference), ``"relative"`` or ``"topk"``; see :func:`branch_keep_mask`.
            branch_threshold: the mask's threshold: a softmax weight for ``"absolute"``, a
                multiple of the uniform weight ``1/N`` for ``"relative"``.
            branch_topk: weights kept per query by a ``"topk"`` mask.
            branch_as_sum: multiply the branch by N, making it a sum over the tokens like
                ``q̂(k̂ᵀv)`` instead of the reference's weighted average of v, which is about 1/N
                of the linear term: even with half the softmax mass kept, its share of the sum
                stays near 1 %.
            branch_chunk_size: queries per chunk in the softmax branch (None: all at once).
            softmax_branch: whether the auxiliary softmax branch is on in training at construction
                (in eval mode it is off unless switched on explicitly).
            compile_tail: with the branch off and an fp32 or bf16 input, run
                :func:`deployed_linear_angular_attention` through ``torch.compile`` (needs a C++
                compiler on CPU, Triton on GPU). Off by default: the eager path is the reference.
            fused: with the branch off and no gradient recorded, run a fused deployed operator:
                on CUDA tensors
                :func:`~castling_det.modeling.fused_attention.fused_linear_angular_attention`
                (two Triton kernels) when Triton is installed and the head dimension is one it
                supports, on CPU tensors
                :func:`~castling_det.modeling.native_attention.native_linear_angular_attention`
                (compiled on first use) or, where it cannot be built or for float64,
                :func:`~castling_det.modeling.blocked_attention.blocked_linear_angular_attention`;
                otherwise, or when False, the eager reference. ``compile_tail`` takes precedence.
                Also the projections' oneDNN calls in bf16 on CPU (see :class:`_MultiHeadAttention`).
            eps: lower clamp of every L2 norm.
        """
        super().__init__(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, fused=fused)
        if conv_kind not in CONV_KINDS:
            raise ValueError(f"conv_kind={conv_kind!r} must be one of {CONV_KINDS}")
        if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size={conv_kernel_size} must be a positive odd number")
        if branch_mask not in BRANCH_MASKS:
            raise ValueError(f"branch_mask={branch_mask!r} must be one of {BRANCH_MASKS}")
        if branch_threshold < 0:
            raise ValueError(f"branch_threshold={branch_threshold} must be >= 0")
        if branch_topk < 1:
            raise ValueError(f"branch_topk={branch_topk} must be positive")
        if branch_chunk_size is not None and branch_chunk_size < 1:
            raise ValueError(f"branch_chunk_size={branch_chunk_size} must be positive or None")
        self.conv_kind = conv_kind
        self.branch_mask = branch_mask
        self.branch_threshold = branch_threshold
        self.branch_topk = branch_topk
        self.branch_as_sum = branch_as_sum
        self.branch_chunk_size = branch_chunk_size
        self.softmax_branch = softmax_branch
        self.branch_at_inference = False
        self.branch_scale = 1.0
        self.branch_stats: Optional[Dict[str, torch.Tensor]] = None
        self.eps = eps
        self.compile_tail = compile_tail

        self.linear_weight = nn.Parameter(torch.ones(num_heads, 1, 1)) if learn_linear_weight else None

        pad = conv_kernel_size // 2
        if conv_kind == "seq":
            self.dwconv = nn.Conv2d(
                num_heads, num_heads, kernel_size=(conv_kernel_size, 1), padding=(pad, 0),
                groups=num_heads, bias=False,
            )
        else:
            self.dwconv = nn.Conv2d(
                dim, dim, kernel_size=conv_kernel_size, padding=pad, groups=dim, bias=False
            )

    def _conv(self, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Depthwise convolution of v, ``(B, heads, N, d)`` in and out."""
        if self.conv_kind == "seq":
            # v read as a ``heads``-channel image of height N and width d.
            return self.dwconv(v)
        return _grid_conv(v, self.dwconv.weight, height, width)

    @property
    def branch_active(self) -> bool:
        """Whether the next forward computes the softmax branch: switched on, in training (or
        asked for at inference too) and at a scale above 0."""
        in_use = self.training or self.branch_at_inference
        return in_use and self.softmax_branch and self.branch_scale > 0

    def _fused_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The fused deployed operator :meth:`attend` runs, or None for the eager reference: one
        is asked for, the branch is off, no gradient is to be recorded (neither has a backward
        pass), and the inputs are ones it takes: the Triton kernels on CUDA (see
        :func:`~castling_det.modeling.fused_attention.fused_attention_available`), on CPU the
        native operator (see
        :func:`~castling_det.modeling.native_attention.native_attention_available`), else the
        blocked one (see
        :func:`~castling_det.modeling.blocked_attention.blocked_attention_available`)."""
        if not self.fused or self.branch_active:
            return None
        tensors = [q, k, v, self.dwconv.weight]
        if self.linear_weight is not None:
            tensors.append(self.linear_weight)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        if fused_attention_available(q):
            return fused_linear_angular_attention
        if native_attention_available(q):
            return native_linear_angular_attention
        if blocked_attention_available(q):
            return blocked_linear_angular_attention
        return None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int):
        """The attention operator alone: per-head ``q, k, v`` of shape ``(B, heads, N, d)`` with
        ``N = height · width`` to the per-head output, same shape, in v's dtype."""
        self.branch_stats = None
        deployed_args = dict(
            conv_kind=self.conv_kind, height=height, width=width,
            linear_weight=self.linear_weight, eps=self.eps,
        )
        if self.compile_tail and not self.branch_active and v.dtype in _WIDE_RANGE_DTYPES:
            return _compiled_deployed_attention()(q, k, v, self.dwconv.weight, **deployed_args)
        fused = self._fused_path(q, k, v)
        if fused is not None:
            return fused(q, k, v, self.dwconv.weight, **deployed_args)

        # Written so that full-size temporaries die early and the tail works in place: in
        # inference the peak is about twice the q, k, v projection, whatever N is.
        acc = torch.promote_types(v.dtype, torch.float32)
        q_acc, k_acc, v_acc = q.to(acc), k.to(acc), v.to(acc)  # no copies when already fp32
        kv = torch.matmul(F.normalize(k_acc, dim=-1, eps=self.eps).transpose(-2, -1), v_acc)
        del k_acc
        # (w/π)·q̂(k̂ᵀv) + 0.5·v
        total = torch.matmul(F.normalize(q_acc, dim=-1, eps=self.eps), kv)
        if self.linear_weight is not None:
            total = total * self.linear_weight.to(acc)  # not in place: w's gradient needs total
        total = total.div_(math.pi).add_(v_acc, alpha=0.5)
        del q_acc, v_acc
        if self.branch_active:
            branch, kept_mass = masked_softmax_attention(
                q, k, v, threshold=self.branch_threshold, mask=self.branch_mask,
                topk=self.branch_topk, chunk_size=self.branch_chunk_size,
            )
            gain = self.branch_scale * (q.shape[-2] if self.branch_as_sum else 1)
            branch = branch.to(acc) * gain
            if self.training:
                share = branch.norm(dim=-1) / (total + branch).norm(dim=-1).clamp_min(1e-12)
                self.branch_stats = {"mass": kept_mass, "share": share.mean().detach()}
            total = total + branch
        out = F.normalize(total, dim=-1, eps=self.eps).to(v.dtype)
        del total
        return out.add_(self._conv(v, height, width))


@functools.lru_cache(maxsize=None)
def _compiled_deployed_attention():
    """:func:`deployed_linear_angular_attention` through ``torch.compile``, built on first use so
    that importing this module does not start the compiler. Compiled for symbolic sizes from the
    first call: a detector sees many image sizes, and each would otherwise compile anew (sizes 0
    and 1 are still specialised, so a batch of one and of two compile once each)."""
    return torch.compile(deployed_linear_angular_attention, dynamic=True)


class SoftmaxAttention(_MultiHeadAttention):
    """Multi-head softmax attention through ``F.scaled_dot_product_attention``.

    The baseline twin of :class:`LinearAngularAttention`: same projections, same layout, same
    keyword arguments ``dim``, ``num_heads``, ``qkv_bias``, ``fused`` (the projections' oneDNN calls,
    as in :class:`_MultiHeadAttention`). Global over its input; the block makes
    it windowed by partitioning the input first.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int):
        """The attention operator alone: per-head ``(B, heads, N, d)`` in and out."""
        return F.scaled_dot_product_attention(q, k, v)
