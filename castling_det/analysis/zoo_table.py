"""The model-zoo table: every shipped config's model, input size, GFLOPs, parameters and measured AP.

Configs are named as :mod:`castling_det.model_zoo` names them (``Shapes/mask_rcnn_....yaml``,
``lazy/....py``). Each is built on the CPU with fresh weights (seed 0) and the softmax branch off, as
deployed. Parameters are fvcore's count, for the whole model and for the ViT (``backbone.net``).
GFLOPs are :func:`~castling_det.analysis.count_gflops` (fvcore multiply-adds plus attention, norms
and GELU) on one all-zero image: 1024×1024 for the COCO configs and the LazyConfigs (ViTDet's
input), and for Shapes and BCCD a typical image of the data set (192×192, 640×480) resized as the
config's test loader resizes it. AP figures come only from a JSON file of measured results (see
:func:`load_ap_table`); a config it does not list is marked as not trained here.
"""
import fnmatch
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import CascadeROIHeads
from fvcore.nn import parameter_count
from torch import nn

from ..config import load_castling_config
from ..model_zoo import get_config_file, list_configs
from ..modeling.backbone import VIT_PRESETS
from ..modeling.branch import set_softmax_branch
from .flops import count_gflops

__all__ = [
    "NOT_TRAINED",
    "ZooRow",
    "attention_label",
    "build_from_config",
    "build_row",
    "describe_model",
    "find_configs",
    "format_row",
    "format_table",
    "load_ap_table",
]

NOT_TRAINED = "not trained here (no GPU run)"
COCO_INPUT = (1024, 1024)
# (H, W) of a typical image of each small data set; its config's test resize is applied to it.
NATIVE_IMAGE_SIZES = {"Shapes": (192, 192), "BCCD": (480, 640)}
AP_FIELDS = ("ap", "data", "source")


@dataclass
class ZooRow:
    """One line of the table; sizes are (H, W), GFLOPs and parameters as counted."""

    config: str
    model: str
    input_size: Tuple[int, int]
    gflops_model: float
    gflops_vit: float
    params: int
    params_vit: int
    ap: str
    data: str
    note: Optional[int] = None  # footnote number of the AP's source


def find_configs(patterns: Sequence[str] = ()) -> List[str]:
    """The shipped configs' names: yacs configs (no ``Base-*``), then LazyConfig recipes.

    Args:
        patterns: shell globs on the names (e.g. ``"Shapes/*"``); empty keeps every config.
    """
    names = list_configs()
    yacs = [n for n in names if n.endswith(".yaml") and not Path(n).name.startswith("Base-")]
    names = yacs + [n for n in names if n.endswith(".py")]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    return names


def load_ap_table(json_path) -> Dict[str, Dict[str, str]]:
    """The measured-AP entries of ``json_path``, keyed by config name; keys starting with ``_``
    are notes. Each entry has the fields ``ap``, ``data`` (the evaluation data) and ``source``
    (where the figure comes from).

    Raises:
        ValueError: an entry names a config castling_det does not ship, or lacks one of the fields.
    """
    entries = {k: v for k, v in json.loads(Path(json_path).read_text()).items() if not k.startswith("_")}
    shipped = set(list_configs())
    for config, entry in entries.items():
        if config not in shipped:
            raise ValueError(f"{json_path}: entry {config!r} names a config that does not exist")
        missing = [field for field in AP_FIELDS if field not in entry]
        if missing:
            raise ValueError(f"{json_path}: entry {config!r} lacks {', '.join(missing)}")
    return entries


def build_from_config(config: str, opts: Sequence[str] = ()) -> Tuple[nn.Module, Tuple[int, int]]:
    """Build ``config``'s model on the CPU (seed 0, branch off, eval mode) and choose its input size.

    Args:
        config: a shipped config's name, a yacs ``.yaml`` or a LazyConfig ``.py``.
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``key=value`` strings (LazyConfig).

    Returns:
        The model and the (H, W) of the image to count it on.

    Raises:
        FileNotFoundError: castling_det ships no config of that name.
    """
    path = get_config_file(config)
    torch.manual_seed(0)  # head FLOPs follow the proposals of the untrained model: keep them fixed
    if path.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(opts))
        model, size = instantiate(cfg.model), COCO_INPUT
    else:
        cfg = load_castling_config(path, opts, device="cpu")
        model, size = build_model(cfg), counting_input_size(config, cfg)
    set_softmax_branch(model, False)
    keep_every_detection(model)
    return model.eval(), size


def keep_every_detection(model: nn.Module) -> None:
    """Score threshold 0 in every predictor, so that the heads run on the full quota of detections
    (``TEST.DETECTIONS_PER_IMAGE``), as a trained model's busiest image: an untrained one scores
    almost nothing above the usual 0.05, and its mask head would count as zero."""
    for module in model.modules():
        if hasattr(module, "test_score_thresh"):
            module.test_score_thresh = 0.0


def counting_input_size(config: str, cfg) -> Tuple[int, int]:
    """(H, W) to count a yacs config on: a typical data-set image resized as its test loader would."""
    family = Path(config).parts[0]
    if family not in NATIVE_IMAGE_SIZES:
        return COCO_INPUT
    height, width = NATIVE_IMAGE_SIZES[family]
    test_sizes = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return ResizeShortestEdge.get_output_shape(height, width, *test_sizes)


def describe_model(model: nn.Module) -> str:
    """E.g. ``Mask R-CNN · ViT-B · window, softmax in blocks 2, 5, 8, 11``, read from the built model."""
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        arch = type(model).__name__
    else:
        arch = ("Cascade " if isinstance(heads, CascadeROIHeads) else "") + (
            "Mask R-CNN" if heads.mask_on else "Faster R-CNN"
        )
    vit = model.backbone.net
    shape = (vit.pos_embed.shape[-1], len(vit.blocks), vit.blocks[0].attn.num_heads)
    size = next((name for name, preset in VIT_PRESETS.items() if preset == shape), "{}d×{}".format(*shape))
    return f"{arch} · ViT-{size} · {attention_label([block.attn_kind for block in vit.blocks])}"


def attention_label(kinds: Sequence[str]) -> str:
    """The most common kind, then the blocks (0-based) of each other kind."""
    main = max(dict.fromkeys(kinds), key=kinds.count)
    others = {kind: [str(i) for i, k in enumerate(kinds) if k == kind] for kind in kinds if kind != main}
    return ", ".join([main] + [f"{kind} in blocks {', '.join(blocks)}" for kind, blocks in others.items()])


def build_row(config: str, ap_table: Dict[str, Dict[str, str]], opts: Sequence[str] = ()) -> ZooRow:
    """Build ``config``'s model and count it: one table row, AP from ``ap_table`` (see load_ap_table)."""
    model, (height, width) = build_from_config(config, opts)
    image = {"image": torch.zeros(3, height, width), "height": height, "width": width}
    gflops = count_gflops(model, [image], modules=("backbone.net",))
    params = parameter_count(model)
    entry = ap_table.get(config, {"ap": NOT_TRAINED, "data": "—"})
    return ZooRow(
        config=config,
        model=describe_model(model),
        input_size=(height, width),
        gflops_model=gflops["model"],
        gflops_vit=gflops["backbone.net"],
        params=params[""],
        params_vit=params["backbone.net"],
        ap=entry["ap"],
        data=entry["data"],
    )


def number_sources(rows: List[ZooRow], ap_table: Dict[str, Dict[str, str]]) -> List[str]:
    """Give each row with a measured AP a footnote number; return the footnotes in order."""
    notes = []
    for row in rows:
        if row.config in ap_table:
            notes.append(ap_table[row.config]["source"])
            row.note = len(notes)
    return notes


def format_row(row: ZooRow, links_from=".") -> str:
    """One Markdown table line; the config links to its file, relative to the folder ``links_from``
    (where the table is written)."""
    link = os.path.relpath(Path(get_config_file(row.config)).resolve(), Path(links_from).resolve())
    ap = row.ap if row.note is None else f"{row.ap} [{row.note}]"
    return (
        f"| [`{row.config}`]({Path(link).as_posix()}) | {row.model} | {row.input_size[0]}×{row.input_size[1]} "
        f"| {row.gflops_model:.1f} | {row.gflops_vit:.1f} | {row.params / 1e6:.1f} "
        f"| {row.params_vit / 1e6:.1f} | {ap} | {row.data} |"
    )


def format_table(
    rows: List[ZooRow], ap_table: Dict[str, Dict[str, str]], *, command: str, minutes: float, machine: str,
    ap_file: str, links_from=".",
) -> str:
    """The whole Markdown file: how it was made, the table, the AP sources.

    Args:
        rows: from :func:`build_row`.
        ap_table: from :func:`load_ap_table`; its sources become numbered footnotes.
        command: the command that made the table; ``minutes``: how long it took; ``machine``: on what.
        ap_file: the AP file's path as the text links it (relative to ``links_from``).
        links_from: the folder the file is written to, from which the config links are relative.
    """
    notes = number_sources(rows, ap_table)
    header = (
        "# Model zoo\n\n"
        f"Generated by `{command}` on {machine} (PyTorch {torch.__version__}, "
        f"Python {platform.python_version()}) in {minutes:.1f} min. Every model is built from its config "
        "with fresh weights (seed 0) and counted with the softmax branch **off**, as deployed. GFLOPs are "
        "fvcore multiply-adds (one multiply-add = one FLOP) with attention, L2 norms and GELU counted "
        "(`castling_det.analysis.count_gflops`), on one all-zero image of the size shown (H×W): 1024×1024 "
        "for the COCO configs and the LazyConfigs (ViTDet's input), and for Shapes and BCCD a typical image "
        "of the data set (192×192, 640×480) resized as the config's test loader does. \"GFLOPs (ViT)\" is "
        "`backbone.net` alone; the model's figure also counts the pyramid and the heads. The heads' share "
        "depends on the untrained model's proposals, and every predictor's score threshold is set to 0 so "
        "that they see the full quota of detections (TEST.DETECTIONS_PER_IMAGE: 100 for COCO, 20 for "
        "Shapes, 50 for BCCD), as a trained model's busiest image would. Parameters are fvcore's count "
        f"(M = 10⁶). The AP column is read from [`{Path(ap_file).name}`]({Path(ap_file).as_posix()}): only "
        "figures measured in this repository, each with its source below.\n\n"
    )
    columns = "| config | model | input | GFLOPs (model) | GFLOPs (ViT) | params (M) | ViT params (M) "
    lines = [columns + "| AP measured here | AP data |", "|---" * 9 + "|"]
    lines += [format_row(row, links_from) for row in rows]
    sources = "".join(f"\n[{i}] {note}\n" for i, note in enumerate(notes, start=1))
    return header + "\n".join(lines) + "\n\nSources of the AP figures:\n" + sources
