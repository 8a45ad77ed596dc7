"""Reading a softmax-ViT checkpoint and finding its ViT tensors: timm (``vit_*``, DeiT), MAE and
Detectron2/ViTDet files.

All three name the ViT's tensors alike (``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``); they differ in the container
(a bare state dict, or one under ``"model"`` / ``"state_dict"``), in a key prefix (a full
Detectron2 detector keeps its ViT under ``backbone.net.``) and in the extras around the ViT
(classifier heads, the MAE decoder, relative position tables).
"""
import os
import pickle
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping

import torch

__all__ = ["SOURCE_FORMATS", "SourceViT", "detect_format", "load_state_dict", "read_source_vit"]

SOURCE_FORMATS = ("timm", "mae", "detectron2")
# The ViT of a full Detectron2 detector (ViTDet's SimpleFeaturePyramid, castling_det's CastlingFPN).
DETECTOR_VIT_PREFIX = "backbone.net."
# Keys every ViT checkpoint has, after its prefix: how a file is recognised as one.
VIT_SIGNATURE_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
_MAE_DECODER = re.compile(r"^(decoder_|mask_token$)")


@dataclass
class SourceViT:
    """The ViT tensors of a checkpoint file, keys relative to the ViT (``blocks.0.norm1.weight``).

    Attributes:
        path: the file.
        format: one of :data:`SOURCE_FORMATS`.
        prefix: what the file puts before the ViT's keys (``""`` or ``"backbone.net."``).
        tensors: the tensors under ``prefix``, prefix stripped.
        outside: the names of the file's other tensors (not under ``prefix``).
    """

    path: str
    format: str
    prefix: str
    tensors: Dict[str, torch.Tensor]
    outside: List[str]


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read with ``torch.load(weights_only=True)`` (no code runs).

    A state dict stored under ``"model"`` (MAE, Detectron2) or ``"state_dict"`` (timm's training
    checkpoints) is taken from there; entries that are not tensors are left out.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read without unpickling code, or holds no tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"cannot read {path!r} with torch.load(weights_only=True): {error}\n"
            "If the file needs code to unpickle (an argparse Namespace, numpy arrays, a model "
            "object) and you trust it, re-save its tensors, e.g. "
            "torch.save({'model': torch.load(PATH, weights_only=False)['model']}, NEW_PATH), "
            "and convert NEW_PATH. Detectron2 model-zoo .pkl files are not torch checkpoints."
        ) from error
    if isinstance(loaded, Mapping):
        for container in ("model", "state_dict"):
            if isinstance(loaded.get(container), Mapping):
                loaded = loaded[container]
                break
    tensors = (
        {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
        if isinstance(loaded, Mapping) else {}
    )
    if not tensors:
        raise ValueError(f"{path!r} holds no state dict of tensors (found {type(loaded).__name__})")
    return tensors


def detect_format(path: str, state: Mapping[str, torch.Tensor]) -> str:
    """Tell which of :data:`SOURCE_FORMATS` a state dict comes from, by its keys.

    ``backbone.net.*`` keys: a Detectron2 detector; ``decoder_*`` or ``mask_token``: an MAE
    pre-training checkpoint; a ViT with ``cls_token`` or a final ``norm``: timm (DeiT and
    fine-tuned MAE included); a ViT with neither: Detectron2's bare ``ViT``.

    Raises:
        ValueError: naming ``path`` and some of its keys, when it is none of these.
    """
    if any(key.startswith(DETECTOR_VIT_PREFIX) for key in state):
        return "detectron2"
    if all(key in state for key in VIT_SIGNATURE_KEYS):
        if any(_MAE_DECODER.match(key) for key in state):
            return "mae"
        if "cls_token" in state or "norm.weight" in state:
            return "timm"
        return "detectron2"
    raise ValueError(
        f"cannot tell the format of {path!r}: it has neither keys under {DETECTOR_VIT_PREFIX!r} "
        f"nor the ViT keys {list(VIT_SIGNATURE_KEYS)} (its first keys: {list(state)[:5]}). "
        f"Is it a ViT checkpoint? If so, name its format with --source {{{','.join(SOURCE_FORMATS)}}}."
    )


def read_source_vit(path: str, source: str = "auto") -> SourceViT:
    """Read ``path`` and split its tensors into the ViT's (prefix stripped) and the rest.

    Args:
        path: a checkpoint file.
        source: one of :data:`SOURCE_FORMATS`, or ``"auto"`` to tell by the keys.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_state_dict` and :func:`detect_format`; also
            when the file lacks the ViT keys the named format puts there.
    """
    if source != "auto" and source not in SOURCE_FORMATS:
        raise ValueError(f"source={source!r} must be 'auto' or one of {SOURCE_FORMATS}")
    state = load_state_dict(path)
    fmt = detect_format(path, state) if source == "auto" else source
    prefix = ""
    if fmt == "detectron2" and any(key.startswith(DETECTOR_VIT_PREFIX) for key in state):
        prefix = DETECTOR_VIT_PREFIX
    tensors = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    missing = [key for key in VIT_SIGNATURE_KEYS if key not in tensors]
    if missing:
        raise ValueError(
            f"{path!r} read as a {fmt} checkpoint has no {prefix + missing[0]!r} "
            f"(its first keys: {list(state)[:5]}); try --source auto or another --source"
        )
    outside = [key for key in state if not key.startswith(prefix)]
    return SourceViT(path=path, format=fmt, prefix=prefix, tensors=tensors, outside=outside)
