"""Conversion of softmax-ViT checkpoints (timm, DeiT, MAE, Detectron2/ViTDet) into Castling-ViT
detector checkpoints; ``tools/convert_weights.py`` is its command line."""
from .converter import convert_checkpoint, convert_vit, find_castling_vit
from .pos_embed import count_prefix_slots, fit_pos_embed
from .report import ConversionReport
from .sources import SOURCE_FORMATS, SourceViT, detect_format, load_state_dict, read_source_vit

__all__ = [
    "SOURCE_FORMATS",
    "ConversionReport",
    "SourceViT",
    "convert_checkpoint",
    "convert_vit",
    "count_prefix_slots",
    "detect_format",
    "find_castling_vit",
    "fit_pos_embed",
    "load_state_dict",
    "read_source_vit",
]
