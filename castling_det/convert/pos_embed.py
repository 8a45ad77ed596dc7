"""Position embeddings of a softmax ViT laid out as :class:`CastlingViT` keeps them.

CastlingViT's ``pos_embed`` is ``(1, 1 + G², C)``: one class-token slot (kept so that ViT and MAE
checkpoints round-trip; the backbone ignores it) and a ``G × G`` grid, ``G`` being
``PRETRAIN_IMG_SIZE // PATCH_SIZE``. Sources put 0 (Detectron2 without a class token, timm's
``no_embed_class``), 1 (ViT, MAE) or 2 (DeiT distilled: class and distillation token) slots first.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["count_prefix_slots", "fit_pos_embed"]


def _is_square(count: int) -> bool:
    return count > 0 and math.isqrt(count) ** 2 == count


def count_prefix_slots(pos_embed: torch.Tensor, num_prefix_tokens: int, key: str = "pos_embed") -> int:
    """How many of ``pos_embed``'s ``(1, slots, C)`` slots precede the square grid.

    Args:
        pos_embed: the source's position embedding.
        num_prefix_tokens: the prefix tokens the source has (class, distillation, register
            tokens); tried first, then 0 and 1 (sources whose tokens have no slot, or whose
            class slot has no token tensor, like Detectron2's ViT).
        key: the tensor's name, for the error.

    Raises:
        ValueError: no such count leaves a square grid.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"{key} has shape {tuple(pos_embed.shape)}, expected (1, tokens, width)")
    slots = pos_embed.shape[1]
    for prefix in dict.fromkeys((num_prefix_tokens, 0, 1)):
        if _is_square(slots - prefix):
            return prefix
    raise ValueError(
        f"{key} of shape {tuple(pos_embed.shape)}: no square patch grid after {num_prefix_tokens} "
        "prefix slot(s); only square pre-training grids are supported"
    )


def fit_pos_embed(pos_embed: torch.Tensor, num_prefix_slots: int, grid: int) -> Tuple[torch.Tensor, str]:
    """Lay a source position embedding out as CastlingViT's ``(1, 1 + grid², C)``.

    The class slot is copied when the source has one and is zero otherwise; further prefix slots
    (DeiT's distillation token) are dropped. The patch grid is resized as timm resizes it when it
    loads a checkpoint: bicubic, ``align_corners=False``, anti-aliased, in float32. PyTorch's
    anti-aliased bicubic uses the cubic with a = -0.5, which keeps a linear function of position
    exactly linear inside the grid when enlarging (the plain bicubic, a = -0.75, does not), and
    to within about 1% of its slope when shrinking. An equal grid is copied exactly.

    Returns:
        The new tensor, in ``pos_embed``'s dtype, and a note saying what was done (empty when the
        result equals the source).
    """
    width = pos_embed.shape[-1]
    source_grid = math.isqrt(pos_embed.shape[1] - num_prefix_slots)
    notes = []
    if num_prefix_slots:
        cls_slot = pos_embed[:, :1]
        if num_prefix_slots > 1:
            notes.append(f"{num_prefix_slots - 1} prefix slot(s) after the class slot dropped")
    else:
        cls_slot = pos_embed.new_zeros(1, 1, width)
        notes.append("class slot added as zeros")
    patches = pos_embed[:, num_prefix_slots:]
    if source_grid != grid:
        image = patches.float().reshape(1, source_grid, source_grid, width).permute(0, 3, 1, 2)
        image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
        patches = image.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(pos_embed.dtype)
        notes.append(f"grid {source_grid}x{source_grid} resized to {grid}x{grid} (bicubic)")
    return torch.cat([cls_slot, patches], dim=1), "; ".join(notes)
