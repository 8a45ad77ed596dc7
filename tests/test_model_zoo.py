"""tools/model_zoo.py: rows count what castling_det counts, AP only from the JSON, clear errors."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fvcore.nn import parameter_count

from castling_det.analysis import count_gflops

REPO = Path(__file__).resolve().parents[1]
SHAPES = "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"
BCCD = "configs/BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml"
# Shrinks the ViT and the heads so that a row takes a second; the input size stays the config's.
TINY = [
    "MODEL.CASTLING.EMBED_DIM", "64", "MODEL.CASTLING.DEPTH", "2", "MODEL.CASTLING.NUM_HEADS", "2",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("model_zoo_tool", REPO / "tools" / "model_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_matches_fvcore_and_castling_det_counts(zoo):
    ap_table = zoo.load_ap_table(zoo.DEFAULT_AP_JSON)
    opts = TINY + ["MODEL.ROI_MASK_HEAD.CONV_DIM", "32"]
    row = zoo.build_row(SHAPES, ap_table, opts)

    model, size = zoo.build_from_config(SHAPES, opts)  # the same seed: the same weights
    assert row.input_size == size == (192, 192)
    thresholds = [m.test_score_thresh for m in model.modules() if hasattr(m, "test_score_thresh")]
    assert thresholds == [0.0]  # the heads count the full quota of detections
    params = parameter_count(model)
    assert row.params == params[""] == sum(p.numel() for p in model.parameters())
    assert row.params_vit == params["backbone.net"] < row.params
    image = {"image": torch.zeros(3, *size), "height": size[0], "width": size[1]}
    gflops = count_gflops(model, [image], modules=("backbone.net",))
    assert 0 < row.gflops_vit < row.gflops_model
    assert row.gflops_model == pytest.approx(gflops["model"])
    assert row.gflops_vit == pytest.approx(gflops["backbone.net"])
    assert row.model == "Mask R-CNN · ViT-64d×2 · castling"

    assert row.ap == ap_table[SHAPES]["ap"]
    text = zoo.format_table([row], ap_table, "python tools/model_zoo.py", 0.5)
    assert f"({'../' + SHAPES})" in text and "[1]" in text and ap_table[SHAPES]["source"] in text


def test_config_missing_from_the_json_is_not_trained_here(zoo, tmp_path):
    row = zoo.build_row(BCCD, {}, TINY)
    assert row.ap == zoo.NOT_TRAINED == "not trained here (no GPU run)"
    assert row.input_size == (320, 427)  # a 640x480 BCCD image, resized by the config's test sizes
    assert row.model == "Faster R-CNN · ViT-64d×2 · castling"


def test_attention_label_names_the_other_blocks(zoo):
    assert zoo.attention_label(["window", "window", "softmax"] * 4) == "window, softmax in blocks 2, 5, 8, 11"
    assert zoo.attention_label(["softmax"] * 12) == "softmax"


def test_missing_config_and_bad_json_entry_raise(zoo, tmp_path):
    with pytest.raises(FileNotFoundError, match="config not found: configs/Shapes/nope.yaml"):
        zoo.build_row("configs/Shapes/nope.yaml", {})
    bad = tmp_path / "ap.json"
    bad.write_text(json.dumps({"configs/BCCD/missing.yaml": {"ap": "1", "data": "d", "source": "s"}}))
    with pytest.raises(ValueError, match="'configs/BCCD/missing.yaml' names a config that does not exist"):
        zoo.load_ap_table(bad)
    bad.write_text(json.dumps({SHAPES: {"ap": "1"}}))
    with pytest.raises(ValueError, match="lacks data, source"):
        zoo.load_ap_table(bad)


def test_committed_table_covers_every_config(zoo):
    configs = zoo.find_configs()
    assert "configs/lazy/cascade_mask_rcnn_castling_vit_b_100ep.py" in configs
    assert not any(Path(c).name.startswith("Base-") or "/common/" in c for c in configs)
    table = (REPO / "docs" / "model_zoo.md").read_text()
    assert [c for c in configs if f"[`{c}`]" not in table] == []
