"""Castling-ViT: a plain ViT backbone whose attention is chosen block by block.

Each block mixes tokens with one of three kinds of attention:

- ``"castling"``: linear-angular attention (:class:`LinearAngularAttention`), global and linear in N;
- ``"softmax"``: global softmax attention (``scaled_dot_product_attention``);
- ``"window"``: softmax attention inside non-overlapping windows, as in ViTDet.

so the softmax-ViT and ViTDet-style baselines are the same code with one setting changed.
"""
from typing import Dict, Optional, Sequence, Union

import torch
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.utils import get_abs_pos, window_partition, window_unpartition
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from .attention import LinearAngularAttention, SoftmaxAttention
from .branch import any_branch_active
from .cuda_graphs import ShapeGraphs
from .fused_linear import linear_forward
from .patch_embed import PatchEmbed

__all__ = ["ATTN_KINDS", "VIT_PRESETS", "Mlp", "Block", "CastlingViT", "vit_feature_names"]

ATTN_KINDS = ("castling", "softmax", "window")

# (embed_dim, depth, num_heads) of the standard ViT sizes; 64 channels per head.
VIT_PRESETS = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}


def vit_feature_names(depth: int):
    """Names of the feature maps a depth-``depth`` :class:`CastlingViT` can return."""
    return ["last_feat"] + [f"block{i}" for i in range(depth)]


class Mlp(nn.Module):
    """Two linear layers with a GELU between them (names as in timm, so its weights map 1:1).

    With ``fused`` (the default), bf16 inference on CPU computes ``act(fc1(x))`` and ``fc2`` in one
    oneDNN call each, biases inside the GEMM
    (:func:`~castling_det.modeling.fused_linear.cpu_fused_linear`); otherwise, and whenever that
    does not apply, the plain ops run.
    """

    def __init__(self, *, dim: int, hidden_dim: int, fused: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = linear_forward(x, self.fc1, self.fused, self.act)
        return linear_forward(hidden, self.fc2, self.fused)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        attn_kind: str = "castling",
        window_size: int = 14,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
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
    ):
        """
        Args:
            dim: token width.
            num_heads: attention heads.
            attn_kind: one of :data:`ATTN_KINDS`.
            window_size: side of the attention windows, in tokens (``"window"`` only).
            mlp_ratio: hidden width of the MLP over ``dim``.
            qkv_bias: whether the q, k, v projection has a bias.
            drop_path: stochastic depth rate of both residual branches.
            conv_kind, conv_kernel_size, learn_linear_weight, branch_mask, branch_threshold,
            branch_topk, branch_as_sum, branch_chunk_size, softmax_branch, compile_tail, fused: passed to
                :class:`LinearAngularAttention` (``"castling"`` only); ``fused`` also to :class:`Mlp`
                and :class:`SoftmaxAttention` (the bf16 CPU projections), so every twin gets them.
        """
        super().__init__()
        if attn_kind not in ATTN_KINDS:
            raise ValueError(f"attn_kind={attn_kind!r} must be one of {ATTN_KINDS}")
        if attn_kind == "window" and window_size < 1:
            raise ValueError(f"window_size={window_size} must be positive for window attention")
        self.attn_kind = attn_kind
        self.window_size = window_size if attn_kind == "window" else 0

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_kind == "castling":
            self.attn = LinearAngularAttention(
                dim=dim,
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                conv_kind=conv_kind,
                conv_kernel_size=conv_kernel_size,
                learn_linear_weight=learn_linear_weight,
                branch_mask=branch_mask,
                branch_threshold=branch_threshold,
                branch_topk=branch_topk,
                branch_as_sum=branch_as_sum,
                branch_chunk_size=branch_chunk_size,
                softmax_branch=softmax_branch,
                compile_tail=compile_tail,
                fused=fused,
            )
        else:
            self.attn = SoftmaxAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, fused=fused)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens ``(B, H, W, C)``; returns the same shape."""
        y = self.norm1(x)
        if self.window_size > 0:
            height, width = y.shape[1:3]
            y, pad_hw = window_partition(y, self.window_size)
            y = self.attn(y)
            y = window_unpartition(y, self.window_size, pad_hw, (height, width))
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CastlingViT(Backbone):
    """A plain, single-scale ViT backbone (ViTDet's layout) with per-block attention kinds.

    Returns stride-``patch_size`` feature maps named ``"last_feat"`` (after the last block) and
    ``"block{i}"`` (after block i, 0-based), whichever ``out_features`` asks for. Blocks after the
    last one asked for are not built: they would have no gradient, which DistributedDataParallel
    rejects, and no use (a checkpoint's tensors for them are reported as unused when loading).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        attn_kinds: Union[str, Sequence[str]] = "castling",
        window_size: int = 14,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
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
        cuda_graphs: bool = False,
        use_act_checkpoint: bool = False,
        out_features: Sequence[str] = ("last_feat",),
    ):
        """
        Args:
            img_size: input size the position embedding is laid out for (the pre-training size);
                it is interpolated to any other input size.
            patch_size: side of the square patches; the output stride.
            in_chans: input image channels.
            embed_dim: token width.
            depth: number of blocks.
            num_heads: attention heads per block; must divide ``embed_dim``.
            attn_kinds: one kind of :data:`ATTN_KINDS` for every block, or a list of ``depth`` kinds.
            window_size: window side in tokens for ``"window"`` blocks.
            mlp_ratio: MLP hidden width over ``embed_dim``.
            qkv_bias: whether the q, k, v projections have a bias.
            drop_path_rate: stochastic depth rate, rising linearly from 0 to this over the blocks.
            conv_kind, conv_kernel_size, learn_linear_weight, branch_mask, branch_threshold,
            branch_topk, branch_as_sum, branch_chunk_size, softmax_branch, compile_tail, fused: settings of
                the ``"castling"`` blocks, see
                :class:`LinearAngularAttention`.
            cuda_graphs: in inference on a CUDA input (eval mode, no gradient, the softmax
                branch off everywhere), run the forward pass as a CUDA graph captured once per
                input shape (:class:`~castling_det.modeling.cuda_graphs.ShapeGraphs`), so that
                kernel launches do not bound it.
            use_act_checkpoint: recompute each block's activations in the backward pass
                (saves memory in training, costs one more forward).
            out_features: names of the feature maps to return.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        kinds = [attn_kinds] * depth if isinstance(attn_kinds, str) else list(attn_kinds)
        if len(kinds) != depth:
            raise ValueError(f"attn_kinds has {len(kinds)} entries, expected 1 or depth={depth}")
        unknown = [name for name in out_features if name not in vit_feature_names(depth)]
        if unknown or not out_features:
            raise ValueError(
                f"out_features={list(out_features)} must be a non-empty subset of "
                f"'last_feat' and 'block0'..'block{depth - 1}'"
            )

        self.patch_size = patch_size
        self.use_act_checkpoint = use_act_checkpoint
        self.cuda_graphs = cuda_graphs
        self._graphs = ShapeGraphs()
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        # One slot more than the patch grid holds the class token of ViT/MAE checkpoints, so they
        # load as they are; the backbone itself does not use it.
        num_positions = (img_size // patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))

        self._last_block_of = {f"block{i}": i for i in range(depth)}
        self._last_block_of["last_feat"] = depth - 1
        num_blocks = max(self._last_block_of[name] for name in out_features) + 1
        # Rates of the full depth: a truncated ViT's blocks train as they would in the whole one.
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()[:num_blocks]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                attn_kind=kind,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rate,
                conv_kind=conv_kind,
                conv_kernel_size=conv_kernel_size,
                learn_linear_weight=learn_linear_weight,
                branch_mask=branch_mask,
                branch_threshold=branch_threshold,
                branch_topk=branch_topk,
                branch_as_sum=branch_as_sum,
                branch_chunk_size=branch_chunk_size,
                softmax_branch=softmax_branch,
                compile_tail=compile_tail,
                fused=fused,
            )
            for kind, rate in zip(kinds, drop_rates)
        )

        self._out_features = list(out_features)
        self._out_feature_channels = {name: embed_dim for name in self._out_features}
        self._out_feature_strides = {name: patch_size for name in self._out_features}

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def freeze(self, freeze_at: int = 0) -> "CastlingViT":
        """Freeze the first stages, as ``MODEL.BACKBONE.FREEZE_AT`` does for Detectron2's ResNet:
        0 freezes nothing, 1 the patch and position embeddings (the "stem"), ``k`` > 1 also the
        first ``k - 1`` blocks. Frozen parameters get ``requires_grad = False``.

        Returns:
            self, for chaining.

        Raises:
            ValueError: ``freeze_at`` outside ``[0, number of blocks + 1]``.
        """
        if not 0 <= freeze_at <= len(self.blocks) + 1:
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, {len(self.blocks) + 1}] "
                "(1: the embeddings, k > 1: also the first k - 1 blocks)"
            )
        if freeze_at >= 1:
            self.pos_embed.requires_grad_(False)
            self.patch_embed.requires_grad_(False)
        for block in self.blocks[: max(freeze_at - 1, 0)]:
            block.requires_grad_(False)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() and the like make new parameter tensors: captured graphs
        # would read the old ones.
        self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def _graphs_apply(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` replays a CUDA graph: asked for, inference on a CUDA input
        with the softmax branch off in every block, and no tracer or compiler looking."""
        return (
            self.cuda_graphs
            and x.is_cuda
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not any_branch_active(self)
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: images ``(B, C, H, W)``; H and W need not be multiples of the patch size (the
                remainder is cropped by the patch embedding), but must be at least one patch.

        Returns:
            dict of feature name to ``(B, embed_dim, H // patch_size, W // patch_size)`` maps.
        """
        if x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])} is smaller than one {self.patch_size}-pixel patch"
            )
        if self._graphs_apply(x):
            return self._graphs(self._forward_eager, x)
        return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # Contiguous (B, H, W, C): elementwise ops keep their input's layout, and on strided
        # memory every residual add and LayerNorm of every block would be slower.
        x = self.patch_embed(x)
        x = x + get_abs_pos(self.pos_embed, True, x.shape[1:3])

        outputs = {}
        for index, block in enumerate(self.blocks):
            if self.use_act_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            for name in self._out_features:
                if self._last_block_of[name] == index:
                    outputs[name] = x.permute(0, 3, 1, 2)
        return outputs
