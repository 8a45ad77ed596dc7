"""castling_det.analysis.zoo_table (tools/model_zoo.py): rows count what the architecture costs,
AP only from the JSON, clear errors."""
import json
import re
from pathlib import Path

import pytest
import torch

from castling_det.analysis.machine import describe_machine
from castling_det.analysis.zoo_table import (
    NOT_TRAINED,
    attention_label,
    build_from_config,
    build_row,
    find_configs,
    format_table,
    load_ap_table,
)
from castling_det.commands import model_zoo

REPO = Path(__file__).resolve().parents[1]
SHAPES = "Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"
BCCD = "BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml"
# Shrinks the ViT and the heads so that a row takes a second; the input size stays the config's.
TINY = [
    "MODEL.CASTLING.EMBED_DIM", "64", "MODEL.CASTLING.DEPTH", "2", "MODEL.CASTLING.NUM_HEADS", "2",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
]


def _tiny_vit_multiply_adds(height, width):
    """The TINY ViT's multiply-adds on an ``height``×``width`` input, worked out by hand from its
    architecture (width d = 64, 2 blocks, 2 heads of d_h = 32, 16-pixel patches, the depthwise
    (9 × 1) convolution over each head's tokens), under the conventions the table states:

    - one multiply-add per weight use: the patch embedding N·3·16²·d, per block the linear layers
      (qkv 3·N·d², proj N·d², MLP 2·4·N·d²), the two attention matmuls k̂ᵀv and q̂(k̂ᵀv)
      (N·d·d_h each, summed over heads), and the depthwise convolution 9·N·d;
    - per element: each LayerNorm 5 (fvcore's count of a norm with affine weights), each L2 norm
      1 (of q, k and the sum), GELU 1 (on the 4·d hidden channels).

    Left out, as fvcore counts them as zero: the residual and ``0.5·v`` additions, the division by
    π, and the bicubic resize of the position embedding. The image is first padded to a multiple
    of the backbone's size divisibility, 32, as Detectron2's preprocessing does.
    """
    padded = [-(-side // 32) * 32 for side in (height, width)]
    n, d, d_h, depth = (padded[0] // 16) * (padded[1] // 16), 64, 32, 2
    patch_embed = n * 3 * 16**2 * d
    linear = (3 + 1 + 4 + 4) * n * d**2
    attention = 2 * n * d * d_h
    convolution = 9 * n * d
    elementwise = 2 * 5 * n * d + 3 * n * d + 4 * n * d
    return patch_embed + depth * (linear + attention + convolution + elementwise)


def test_row_counts_the_architecture_by_hand():
    ap_table = load_ap_table(REPO / "docs" / "model_zoo_ap.json")
    opts = TINY + ["MODEL.ROI_MASK_HEAD.CONV_DIM", "32"]
    row = build_row(SHAPES, ap_table, opts)
    assert row.input_size == (192, 192)
    # Every operation fvcore counts is in the hand count: equal up to float rounding.
    assert row.gflops_vit * 1e9 == pytest.approx(_tiny_vit_multiply_adds(192, 192), rel=1e-9)
    assert row.gflops_model > row.gflops_vit  # the pyramid and the heads on top

    model, size = build_from_config(SHAPES, opts)  # the same seed: the same weights
    assert size == row.input_size
    thresholds = [m.test_score_thresh for m in model.modules() if hasattr(m, "test_score_thresh")]
    assert thresholds == [0.0]  # the heads count the full quota of detections
    assert row.params == sum(p.numel() for p in model.parameters())
    assert row.params_vit == sum(p.numel() for p in model.backbone.net.parameters()) < row.params
    assert row.model == "Mask R-CNN · ViT-64d×2 · castling"

    assert row.ap == ap_table[SHAPES]["ap"]
    text = format_table([row], ap_table, command="python tools/model_zoo.py", minutes=0.5, machine="a CPU",
                        ap_file="model_zoo_ap.json", links_from=REPO / "docs")
    assert f"[`{SHAPES}`](../configs/{SHAPES})" in text
    assert "[1]" in text and ap_table[SHAPES]["source"] in text


def test_config_missing_from_the_json_is_not_trained_here():
    row = build_row(BCCD, {}, TINY)
    assert row.ap == NOT_TRAINED == "not trained here (no GPU run)"
    assert row.input_size == (320, 427)  # a 640x480 BCCD image, resized by the config's test sizes
    assert row.gflops_vit * 1e9 == pytest.approx(_tiny_vit_multiply_adds(320, 427), rel=1e-9)
    assert row.model == "Faster R-CNN · ViT-64d×2 · castling"


def test_attention_label_names_the_other_blocks():
    assert attention_label(["window", "window", "softmax"] * 4) == "window, softmax in blocks 2, 5, 8, 11"
    assert attention_label(["softmax"] * 12) == "softmax"


def test_missing_config_and_bad_json_entry_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config 'Shapes/nope.yaml'"):
        build_row("Shapes/nope.yaml", {})
    bad = tmp_path / "ap.json"
    bad.write_text(json.dumps({"BCCD/missing.yaml": {"ap": "1", "data": "d", "source": "s"}}))
    with pytest.raises(ValueError, match="'BCCD/missing.yaml' names a config that does not exist"):
        load_ap_table(bad)
    bad.write_text(json.dumps({SHAPES: {"ap": "1"}}))
    with pytest.raises(ValueError, match="lacks data, source"):
        load_ap_table(bad)


def test_committed_table_covers_every_config():
    configs = find_configs()
    assert "lazy/cascade_mask_rcnn_castling_vit_b_100ep.py" in configs
    assert not any(Path(c).name.startswith("Base-") or "/common/" in c for c in configs)
    table = (REPO / "docs" / "model_zoo.md").read_text()
    assert [c for c in configs if f"[`{c}`](../configs/{c})" not in table] == []


def test_the_command_writes_paths_relative_to_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "ap.json").write_text(json.dumps({}))
    monkeypatch.chdir(tmp_path)
    model_zoo.main(["--configs", "BCCD/*", "--ap-json", "ap.json", "--output", "out/zoo.md"])
    text = (tmp_path / "out" / "zoo.md").read_text()
    assert text.startswith("# Model zoo\n\nGenerated by `castling-model-zoo --configs 'BCCD/*' --ap-json ap.json")
    assert describe_machine(torch.device("cpu"))["device"] in text
    assert "[`ap.json`](../ap.json)" in text  # links relative to the table's folder
    link = re.search(rf"\[`{re.escape(BCCD)}`\]\(([^)]+)\)", text).group(1)
    assert (tmp_path / "out" / link).resolve() == (REPO / "configs" / BCCD).resolve()
    with pytest.raises(SystemExit) as exit_info:
        model_zoo.main(["--ap-json", "missing.json"])
    assert exit_info.value.code == 2  # argparse's usage error
    assert "--ap-json missing.json: no such file" in capsys.readouterr().err
