"""The LazyConfig recipes load and instantiate; tools/lazyconfig_train_net.py trains from one."""
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads

import castling_det
from castling_det.data import make_shapes_dataset
from castling_det.engine.branch_schedule import BranchSchedule

REPO = Path(__file__).resolve().parents[1]
LAZY = REPO / "configs" / "lazy"


@pytest.mark.parametrize(
    "name,heads",
    [("mask_rcnn_castling_vit_b_100ep.py", StandardROIHeads),
     ("cascade_mask_rcnn_castling_vit_b_100ep.py", CascadeROIHeads)],
)
def test_recipe_loads_and_instantiates(name, heads):
    cfg = LazyConfig.load(str(LAZY / name))
    model = instantiate(cfg.model)
    assert isinstance(model.backbone, castling_det.CastlingFPN)
    vit = model.backbone.net
    assert len(vit.blocks) == 12 and vit.blocks[0].attn.qkv.in_features == 768
    assert len(castling_det.modeling.branch_modules(model)) == 12
    assert type(model.roi_heads) is heads
    cfg.optimizer.params.model = model
    # From scratch: no layer-wise decay, every parameter at the base learning rate.
    assert cfg.train.init_checkpoint == ""
    assert {group["lr"] for group in instantiate(cfg.optimizer).param_groups} == {cfg.optimizer.lr}
    # ViTDet's fine-tuning decay, when set, scales block i by 0.7^(12 - i), the embeddings by 0.7^13
    cfg.optimizer.params.lr_factor_func.keywords["lr_decay_rate"] = 0.7
    lr_of = {
        id(p): group["lr"] for group in instantiate(cfg.optimizer).param_groups for p in group["params"]
    }
    base = cfg.optimizer.lr
    assert lr_of[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(base * 0.7**12)
    assert lr_of[id(vit.blocks[11].mlp.fc2.weight)] == pytest.approx(base * 0.7)
    assert lr_of[id(vit.patch_embed.proj.weight)] == pytest.approx(base * 0.7**13)
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.0) < scheduler(0.5) == 1.0 > scheduler(0.99)
    assert cfg.train.max_iter == 184375 and set(cfg.train.branch) >= {"anneal_end", "l1_weight"}
    assert [type(a).__name__ for a in instantiate(cfg.dataloader.train.mapper.augmentations)] == [
        "RandomFlip", "ResizeScale", "FixedSizeCrop"
    ]


def _attention_recipe(vit):
    """What makes a Castling-ViT's attention recipe: per block, the attention kind and, for castling
    blocks, the convolution on v, the linear weight and the softmax branch's mask."""
    recipe = []
    for block in vit.blocks:
        attn = block.attn
        entry = {"kind": block.attn_kind, "window": block.window_size}
        if block.attn_kind == "castling":
            entry.update(
                conv_kind=attn.conv_kind, conv_weight=tuple(attn.dwconv.weight.shape),
                linear_weight=attn.linear_weight is not None, branch=attn.softmax_branch,
                mask=attn.branch_mask, threshold=attn.branch_threshold, topk=attn.branch_topk,
                as_sum=attn.branch_as_sum,
            )
        recipe.append(entry)
    return recipe


def test_yacs_and_lazyconfig_build_the_same_recipe():
    """The ViT-B Mask R-CNN recipes of both config systems train the same attention and retire the
    branch on the same schedule (fractions of training), so results from either carry over."""
    yacs = castling_det.load_castling_config(
        str(REPO / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_castling_vit_b_fpn_3x.yaml")
    )
    lazy = LazyConfig.load(str(LAZY / "mask_rcnn_castling_vit_b_100ep.py"))
    yacs_vit = build_backbone(yacs).net
    lazy_vit = instantiate(lazy.model.backbone.net)
    assert _attention_recipe(yacs_vit) == _attention_recipe(lazy_vit)
    # The default recipe: the branch keeps the weights >= 1/N (alive at a uniform softmax), no L1.
    assert _attention_recipe(lazy_vit)[0]["mask"] == "relative"
    yacs_schedule = BranchSchedule.from_config(yacs)
    lazy_schedule = BranchSchedule(max_iter=yacs.SOLVER.MAX_ITER, **lazy.train.branch)
    assert yacs_schedule == lazy_schedule and yacs_schedule.l1_weight == 0.0


def test_lazyconfig_train_net_runs_on_shapes(tmp_path):
    splits = make_shapes_dataset(tmp_path / "data", num_train=6, num_val=3, image_size=96, seed=1)
    (train_json, train_dir), (val_json, val_dir) = splits["train"], splits["val"]
    cmd = [
        sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"),
        "--config-file", str(LAZY / "mask_rcnn_castling_vit_b_100ep.py"),
        "--register-coco", "lazy_shapes_train", str(train_json), str(train_dir),
        "--register-coco", "lazy_shapes_val", str(val_json), str(val_dir),
        "dataloader.train.dataset.names=lazy_shapes_train", "dataloader.test.dataset.names=lazy_shapes_val",
        "dataloader.train.mapper.augmentations=[]", "dataloader.test.mapper.augmentations=[]",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "model.roi_heads.num_classes=3",
        "model.backbone.net.depth=2", "model.backbone.net.embed_dim=192", "model.backbone.net.num_heads=3",
        "train.device=cpu", "train.amp.enabled=True", "train.amp.dtype=bfloat16",  # bf16 autocast on the CPU
        "train.max_iter=3", "train.eval_period=0",
        "lr_multiplier.scheduler.milestones=[1,2]", "train.flops_num_images=1",
        # Fewer regions: the ROI heads would otherwise take most of the run's time on the CPU.
        "model.roi_heads.batch_size_per_image=64", "model.proposal_generator.post_nms_topk=[64,32]",
        "model.roi_heads.box_predictor.test_topk_per_image=10",
        f"train.output_dir={tmp_path / 'out'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    table = result.stdout.split("Softmax branch on and off:")[-1]
    assert "| on " in table and "| off " in table and "segm AP" in table
