"""The shapes data set, every config file, and tools/train_net.py end to end (tiny run)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model

import castling_det
from castling_det.data import SHAPE_CATEGORIES, make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_train=8, num_val=4, image_size=96, seed=3)


def test_shapes_dataset_is_deterministic_and_consistent(shapes, tmp_path):
    again = make_shapes_dataset(tmp_path, num_train=8, num_val=4, image_size=96, seed=3)
    for split in ("train", "val"):
        assert shapes[split][0].read_text() == again[split][0].read_text()
    coco = json.loads(shapes["train"][0].read_text())
    assert [c["name"] for c in coco["categories"]] == [c["name"] for c in SHAPE_CATEGORIES]
    assert len(coco["images"]) == 8 and len(coco["annotations"]) >= 8
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        assert w > 0 and h > 0 and 0 < ann["area"] <= w * h
        assert np.allclose(poly.min(axis=0), [x, y], atol=0.01)
        assert np.allclose(poly.max(axis=0), [x + w, y + h], atol=0.01)
        assert 0 <= x and x + w <= 96 and 0 <= y and y + h <= 96


def test_shapes_dataset_loads_in_detectron2(shapes):
    json_path, image_dir = shapes["val"]
    records = load_coco_json(str(json_path), str(image_dir), dataset_name="test_shapes_val")
    assert len(records) == 4
    assert all(Path(r["file_name"]).is_file() for r in records)
    assert all(len(r["annotations"]) >= 1 for r in records)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_builds(path):
    cfg = get_cfg()
    castling_det.add_castling_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    vit = model.backbone.net
    assert isinstance(vit, castling_det.CastlingViT)
    expected_width = {"Ti": 192, "S": 384, "B": 768}[cfg.MODEL.CASTLING.SIZE]
    assert vit.blocks[0].attn.qkv.in_features == expected_width
    is_retinanet = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    head_features = cfg.MODEL.RETINANET.IN_FEATURES if is_retinanet else cfg.MODEL.RPN.IN_FEATURES
    assert set(model.backbone.output_shape()) >= set(head_features)


def test_train_net_runs_and_prints_the_branch_table(shapes, tmp_path):
    (train_json, train_dir), (val_json, val_dir) = shapes["train"], shapes["val"]
    cmd = [
        sys.executable, str(REPO / "tools" / "train_net.py"),
        "--config-file", str(REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"),
        "--register-coco", "shapes_train", str(train_json), str(train_dir),
        "--register-coco", "shapes_val", str(val_json), str(val_dir),
        "OUTPUT_DIR", str(tmp_path / "out"),
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.CASTLING.DEPTH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    table = result.stdout.split("Softmax branch on and off:")[-1].splitlines()
    header, rows = table[1], [line.split("|")[1].strip() for line in table[3:5]]
    assert "bbox AP" in header and "segm AP" in header and "backbone GFLOPs" in header
    assert rows == ["on", "off"]


def test_train_net_names_a_missing_dataset_path(tmp_path):
    missing = tmp_path / "nope.json"
    cmd = [
        sys.executable, str(REPO / "tools" / "train_net.py"),
        "--config-file", str(REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"),
        "--register-coco", "shapes_train", str(missing), str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"'shapes_train': annotation file {missing} does not exist" in result.stderr


def _analyze(branch, *tasks):
    cmd = [
        sys.executable, str(REPO / "tools" / "analyze_model.py"),
        "--config-file", str(REPO / "configs/COCO-Detection/faster_rcnn_castling_vit_ti_fpn_3x.yaml"),
        "--tasks", *tasks, "--input-size", "96", "128", "--softmax-branch", branch,
        "MODEL.CASTLING.DEPTH", "2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _table_flops(out: str, module: str) -> float:
    """The FLOPs of one module's row in fvcore's table (e.g. ``42.5M``), as a number."""
    row = next(line for line in out.splitlines() if line.startswith(f"| {module} "))
    value = row.split("|")[3].strip()
    return float(value[:-1]) * {"K": 1e3, "M": 1e6, "G": 1e9}[value[-1]]


def test_analyze_model_counts_the_branch_in_its_flop_table():
    vit = {}
    for branch in ("on", "off"):
        out = _analyze(branch, "flop", "parameter")
        assert "| backbone.net.blocks " in out and "#parameters or shape" in out
        assert "GFLOPs (multiply-adds)" in out
        vit[branch] = _table_flops(out, "backbone.net")
    # The branch adds q·kᵀ and A·v, 2·N²·d per block: N = 6·8 tokens, d = 192, 2 blocks.
    assert vit["on"] - vit["off"] == pytest.approx(2 * 48**2 * 192 * 2, rel=1e-3)
