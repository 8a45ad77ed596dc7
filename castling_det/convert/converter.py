"""Convert a softmax-ViT checkpoint (timm, DeiT, MAE, Detectron2/ViTDet) into a Castling-ViT detector's.

The ViT's tensors keep their names (CastlingViT names them as timm and Detectron2 do) and gain
the detector's prefix (``backbone.net.``); a position embedding is laid out and resized as
:func:`~castling_det.convert.pos_embed.fit_pos_embed` says. The q, k, v projection keeps its
layout (``(3, heads, head_dim)`` along the output rows), so a block keeps its q, k and v.

What a softmax ViT has not got is initialised so that each block starts from the pretrained one:

- the depthwise convolution on v (``attn.dwconv.weight``) is **zero**: a converted block starts as
  pure linear-angular attention over the pretrained q, k, v, without an untrained convolution
  adding noise to every block's residual stream. It still learns from the first step, since the
  gradient of a convolution's weight depends on its input and output gradient, not on the weight.
- the softmax branch owns no parameters (it reuses q and k), so it needs nothing.
- a bias the source layer has not got (``qkv_bias=False`` sources) is zero, and a missing
  absolute position embedding is zero: both give what the source computed.

The detector's other parts (pyramid, RPN, ROI heads) are not written: loading the output with
``MODEL.WEIGHTS`` leaves them at the model's own initialisation. Source tensors without a place
in Castling-ViT are dropped and reported: classifier heads and the final norm, the class and
distillation tokens, the MAE decoder, ViTDet's relative position tables (a loss: the converted
attention has no relative position bias) and anything else.
"""
import math
import re
from typing import Dict, Tuple

import torch
from torch import nn

from ..modeling import CastlingViT
from .pos_embed import count_prefix_slots, fit_pos_embed
from .report import ConversionReport
from .sources import SourceViT, read_source_vit

__all__ = ["convert_checkpoint", "convert_vit", "find_castling_vit"]

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
# Target keys a source may lack: they start at zero, for the reason given.
_ZERO_WHEN_MISSING = (
    (re.compile(r"\.attn\.dwconv\.weight$"),
     "zeros: the block starts as linear-angular attention without the convolution on v"),
    (re.compile(r"^pos_embed$"), "zeros: the source has no absolute position embedding"),
)
# Source keys without a place in Castling-ViT: why, and whether dropping them changes a block.
_DROP_REASONS = (
    (re.compile(r"^(head|head_dist|fc_norm|pre_logits)\."), "classifier head", False),
    (re.compile(r"^norm\."), "the classifier's final norm (Castling-ViT, like ViTDet, has none)", False),
    (re.compile(r"^(cls_token|dist_token|reg_token)$"), "prefix token (the detector uses none)", False),
    (re.compile(r"^(decoder_|mask_token$)"), "MAE decoder", False),
    (re.compile(r"\.attn\.rel_pos_[hw]$"), "relative position table (Castling-ViT has none)", True),
)


def find_castling_vit(model: nn.Module) -> Tuple[str, CastlingViT]:
    """The model's one :class:`CastlingViT` and the prefix of its keys (``"backbone.net."``).

    Raises:
        ValueError: the model has no CastlingViT, or more than one.
    """
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, CastlingViT)]
    if len(found) != 1:
        raise ValueError(
            f"the target model has {len(found)} CastlingViT modules, expected one "
            "(is MODEL.BACKBONE.NAME one of castling_det's backbones?)"
        )
    name, module = found[0]
    return (name + "." if name else ""), module


def _shape_hint(key: str, source: torch.Size, target: torch.Size) -> str:
    """Which config setting a shape mismatch points at."""
    if key == "patch_embed.proj.weight":
        if source[0] != target[0]:
            return "the width (MODEL.CASTLING.SIZE / EMBED_DIM) differs"
        if source[1] != target[1]:
            return "the input channels differ"
        return "the patch size (MODEL.CASTLING.PATCH_SIZE) differs"
    if key.endswith("mlp.fc1.weight") and source[1] == target[1]:
        return "the MLP width (MODEL.CASTLING.MLP_RATIO) differs"
    if key.endswith("attn.dwconv.weight"):
        return "the convolution (MODEL.CASTLING.CONV_KIND / CONV_KERNEL_SIZE / NUM_HEADS) differs"
    return "the width (MODEL.CASTLING.SIZE / EMBED_DIM) differs"


def _check_shape(source: SourceViT, key: str, target: torch.Tensor) -> None:
    source_shape = source.tensors[key].shape
    if source_shape != target.shape:
        raise ValueError(
            f"{source.prefix + key!r} of {source.path!r} has shape {tuple(source_shape)}, the "
            f"target's has {tuple(target.shape)}: {_shape_hint(key, source_shape, target.shape)}"
        )


def _depth(keys) -> int:
    matches = (_BLOCK_INDEX.match(key) for key in keys)
    return 1 + max((int(m.group(1)) for m in matches if m), default=-1)


def _check_layout(source: SourceViT, target: Dict[str, torch.Tensor]) -> None:
    """Width, patch size and depth first, so that a wrong config is named before any block key."""
    _check_shape(source, "patch_embed.proj.weight", target["patch_embed.proj.weight"])
    source_depth, target_depth = _depth(source.tensors), _depth(target)
    if source_depth != target_depth:
        raise ValueError(
            f"depth mismatch: {source.path!r} has {source_depth} blocks ({source.prefix}blocks.0 to "
            f"{source.prefix}blocks.{source_depth - 1}), the target has {target_depth} "
            "(MODEL.CASTLING.SIZE / DEPTH)"
        )


def _new_init(source: SourceViT, key: str) -> str:
    """How a target key the source lacks is initialised (always zeros), or an error if it must
    not be missing."""
    for pattern, note in _ZERO_WHEN_MISSING:
        if pattern.search(key):
            return note
    if key.endswith(".bias") and key[: -len("bias")] + "weight" in source.tensors:
        return "zeros: the source layer has no bias"
    raise ValueError(f"{source.path!r} has no {source.prefix + key!r}, which the target's ViT needs")


def _drop_reason(key: str) -> Tuple[str, bool]:
    for pattern, reason, changes_block in _DROP_REASONS:
        if pattern.search(key):
            return reason, changes_block
    return "no counterpart in Castling-ViT", True


def _prefix_tokens(source: SourceViT) -> int:
    """Class, distillation and register tokens of the source (slots its pos_embed may hold)."""
    tokens = [source.tensors.get(name) for name in ("cls_token", "dist_token", "reg_token")]
    return sum(token.shape[1] for token in tokens if token is not None and token.dim() == 3)


def convert_vit(
    source: SourceViT, target: Dict[str, torch.Tensor], target_prefix: str = ""
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Map a source ViT's tensors onto a CastlingViT's state dict.

    Args:
        source: the source's ViT tensors (:func:`~castling_det.convert.sources.read_source_vit`).
        target: the CastlingViT's ``state_dict()``, for key names, shapes and dtypes.
        target_prefix: put before every output key (the ViT's place in the detector).

    Returns:
        A tensor for every target key, under ``target_prefix + key``, in the target's dtype, and
        the report (its ``left_to_model`` empty).

    Raises:
        ValueError: naming the key and both shapes when width, patch size or any tensor's shape
            differs; on a depth mismatch; when the source lacks a tensor the ViT needs.
    """
    _check_layout(source, target)
    report = ConversionReport(source_path=source.path, source_format=source.format)
    converted = {}
    for key, like in target.items():
        out_key = target_prefix + key
        if key not in source.tensors:
            report.initialised[out_key] = _new_init(source, key)
            converted[out_key] = torch.zeros_like(like)
            continue
        tensor = source.tensors[key]
        if key == "pos_embed":
            if tensor.shape[-1] != like.shape[-1]:
                _check_shape(source, key, like)
            slots = count_prefix_slots(tensor, _prefix_tokens(source), source.prefix + key)
            tensor, note = fit_pos_embed(tensor, slots, grid=_grid_of(like))
            if note:
                report.converted[out_key] = note
            else:
                report.matched.append(out_key)
        else:
            _check_shape(source, key, like)
            report.matched.append(out_key)
        # a copy: a view would save its whole storage (and alias the source)
        converted[out_key] = tensor.to(like.dtype).clone(memory_format=torch.contiguous_format)
    for key in sorted(source.tensors.keys() - target.keys()):
        reason, changes_block = _drop_reason(key)
        report.dropped[source.prefix + key] = reason
        if changes_block:
            report.warnings.append(f"dropped {source.prefix + key}: {reason}; the converted model differs")
    report.dropped_outside = list(source.outside)
    return converted, report


def _grid_of(pos_embed: torch.Tensor) -> int:
    """Side of CastlingViT's position grid (``pos_embed`` has one class slot before it)."""
    return math.isqrt(pos_embed.shape[1] - 1)


def convert_checkpoint(
    path: str, model: nn.Module, source: str = "auto"
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Convert the checkpoint at ``path`` for ``model``, a detector (or bare backbone) with one
    :class:`CastlingViT`.

    Args:
        path: a timm, DeiT, MAE or Detectron2/ViTDet checkpoint.
        model: the target, built from its config (only its keys, shapes and dtypes are read).
        source: ``"timm"``, ``"mae"``, ``"detectron2"`` or ``"auto"``.

    Returns:
        The ViT's tensors under the model's key names, ready for ``torch.save({"model": ...})``
        and ``DetectionCheckpointer``, and the report.
    """
    prefix, vit = find_castling_vit(model)
    converted, report = convert_vit(read_source_vit(path, source), vit.state_dict(), prefix)
    report.left_to_model = [key for key in model.state_dict() if key not in converted]
    return converted, report

