"""The ViT's patch embedding, computed as one matmul over non-overlapping patches."""
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone import utils as d2_utils

__all__ = ["PatchEmbed"]


class PatchEmbed(d2_utils.PatchEmbed):
    """Detectron2's :class:`~detectron2.modeling.backbone.utils.PatchEmbed` (the same ``proj``
    convolution, so the same checkpoint keys) for ``patch_size``-pixel patches with no overlap.

    A convolution whose stride equals its kernel is a linear layer applied to each flattened
    patch, and that is how it runs here: on CPU oneDNN's 16×16 stride-16 convolution is slower
    than the matmul and grows faster than the pixel count in bf16, and the matmul writes the
    contiguous ``(B, H, W, C)`` layout that the blocks read, where the convolution's output needs
    a permute and a copy. Pixels beyond the last whole patch are dropped, as by the convolution.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images to ``(B, H // p, W // p, embed_dim)`` contiguous tokens."""
        p = self.patch_size
        batch, channels = x.shape[:2]
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each patch flattened as the conv weight is.
        patches = (
            x[..., : grid_h * p, : grid_w * p]
            .reshape(batch, channels, grid_h, p, grid_w, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, grid_h, grid_w, channels * p * p)
        )
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
