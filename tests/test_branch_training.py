"""Training that retires the softmax branch, the switch hook, and tools/train_net.py end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from castling_det import load_castling_config
from castling_det.data import make_shapes_dataset, register_coco_dataset, register_voc_dataset
from castling_det.engine import BranchRegularizer, BranchSchedule, CastlingTrainer, unwrap_model
from castling_det.modeling import branch_modules
from conftest import detection_batch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
SHAPES_CONFIG = REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"
# Castling-ViT-Ti, two blocks, 96-pixel images: N = 36 tokens of width 192.
TINY_RUN_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.CASTLING.DEPTH", "2",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "TEST.FLOPS_NUM_IMAGES", "2",
]


def _train_net(*args, timeout=600):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _read_metrics(output_dir: Path):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    splits = make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=96, seed=5
    )
    (train_json, train_dir), (val_json, val_dir) = splits["train"], splits["val"]
    return [
        "--register-coco", "shapes_train", train_json, train_dir,
        "--register-coco", "shapes_val", val_json, val_dir,
    ]


@pytest.fixture(scope="module")
def tiny_run(shapes, tmp_path_factory):
    """6 iterations, evaluated at iteration 3 and at the end; the branch is retired at 3."""
    output_dir = tmp_path_factory.mktemp("tiny_run")
    result = _train_net(
        "--config-file", SHAPES_CONFIG, *shapes, "OUTPUT_DIR", output_dir, *TINY_RUN_OPTS,
        "SOLVER.MAX_ITER", 6, "TEST.EVAL_PERIOD", 3, "SOLVER.CHECKPOINT_PERIOD", 3,
        "MODEL.CASTLING.BRANCH.ANNEAL_START", 0.0, "MODEL.CASTLING.BRANCH.ANNEAL_END", 0.5,
        "MODEL.CASTLING.BRANCH.L1_RAMP_END", 0.0,
    )
    return SimpleNamespace(output_dir=output_dir, stdout=result.stdout)


# --------------------------------------------------------------------------------------------
# The schedule and the regulariser
# --------------------------------------------------------------------------------------------
def test_schedule_ramps_the_l1_weight_and_anneals_the_scale_to_exactly_zero():
    schedule = BranchSchedule(max_iter=100, l1_weight=2.0, l1_ramp_end=0.5, anneal_start=0.5, anneal_end=0.8)
    assert [schedule.l1_weight_at(i) for i in (0, 25, 50, 99)] == [0.0, 1.0, 2.0, 2.0]
    assert [schedule.scale_at(i) for i in (0, 50, 65, 79)] == pytest.approx([1.0, 1.0, 0.5, 1 / 30])
    assert schedule.scale_at(80) == 0.0 and schedule.scale_at(99) == 0.0


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(l1_weight=-1.0), "L1_WEIGHT"),
        (dict(l1_ramp_end=1.5), "L1_RAMP_END"),
        (dict(anneal_start=0.9, anneal_end=0.8), "ANNEAL_START"),
    ],
)
def test_schedule_rejects_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        BranchSchedule(max_iter=10, **kwargs)


def test_regularizer_adds_the_l1_loss_until_the_branch_is_retired(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN", mask_on=False)
    model = build_model(cfg).train()
    schedule = BranchSchedule(max_iter=4, l1_weight=0.5, l1_ramp_end=0.0, anneal_start=0.0, anneal_end=0.5)
    regularizer = BranchRegularizer(model, schedule)
    with torch.no_grad():  # sharper softmax, so the mask keeps some weights and drops others
        for module in regularizer._modules.values():
            module.qkv.weight.mul_(8.0)
    with EventStorage(0) as storage:
        regularizer.trainer = SimpleNamespace(iter=0, storage=storage)
        seen = []
        for iteration in range(4):
            regularizer.trainer.iter = iteration
            storage.iter = iteration
            regularizer.before_step()
            losses = model(detection_batch())
            regularizer.after_step()
            seen.append("loss_branch_l1" in losses)
            if iteration == 1:  # scale 0.5: the penalty is 0.5 x the mean kept mass, differentiable
                masses = torch.stack([m.branch_stats["mass"] for m in regularizer._modules.values()])
                assert ((0 < masses) & (masses < 1)).all()
                expected = 0.5 * masses.mean()
                assert losses["loss_branch_l1"].item() == pytest.approx(expected.item())
                losses["loss_branch_l1"].backward()
                qkv = next(iter(regularizer._modules.values())).qkv.weight
                assert qkv.grad is not None and qkv.grad.abs().sum() > 0
        assert seen == [True, True, False, False]
        assert storage.history("branch/scale").values() == [(1.0, 0), (0.5, 1), (0.0, 2), (0.0, 3)]
        assert all(m.branch_scale == 0.0 and m.branch_stats is None for m in regularizer._modules.values())
        assert len(storage.history("branch/mass/block0").values()) == 2


def test_a_resumed_regularizer_restores_the_scale_of_the_checkpoints_last_step(make_detector_cfg):
    model = build_model(make_detector_cfg("GeneralizedRCNN", mask_on=False))
    schedule = BranchSchedule(max_iter=10, anneal_start=0.0, anneal_end=1.0)  # scale 1 - i/10
    regularizer = BranchRegularizer(model, schedule)
    modules = list(regularizer._modules.values())
    regularizer.trainer = SimpleNamespace(iter=6)  # resumed after 6 steps: the last one was 5
    regularizer.before_train()
    assert all(m.branch_scale == pytest.approx(schedule.scale_at(5)) for m in modules)
    assert schedule.scale_at(5) != 1.0
    for module in modules:
        module.branch_scale = 1.0
    regularizer.trainer.iter = 0  # a fresh run: the first step sets the scale
    regularizer.before_train()
    assert all(m.branch_scale == 1.0 for m in modules)


# --------------------------------------------------------------------------------------------
# The switch hook on a tiny run
# --------------------------------------------------------------------------------------------
def _vit_gflops_from_formulas(num_tokens, width, depth, patch=16, head_dim=64, branch=False):
    """Worked out by hand: per block 12·N·d² (linear layers) + 2·N·d·d_h (linear-angular attention)
    [+ 2·N²·d (the softmax branch)], plus the patch embedding N·3·p²·d; multiply-adds."""
    per_block = 12 * num_tokens * width**2 + 2 * num_tokens * width * head_dim
    if branch:
        per_block += 2 * num_tokens**2 * width
    return (depth * per_block + num_tokens * 3 * patch**2 * width) / 1e9


def test_switch_hook_reports_ap_and_gflops_on_and_off(tiny_run):
    history = json.loads((tiny_run.output_dir / "branch_switch.json").read_text())
    assert [record["iteration"] for record in history] == [3, 6]
    final = history[-1]
    assert set(final) == {"iteration", "train_branch_scale", "branch_on", "branch_off"}
    assert final["train_branch_scale"] == 0.0
    for state in ("branch_on", "branch_off"):
        assert set(final[state]) == {"bbox", "segm", "gflops"}
        assert {"AP", "AP50", "AP75"} <= set(final[state]["bbox"])
        assert set(final[state]["gflops"]) == {"model", "backbone", "backbone.net"}
    on, off = final["branch_on"]["gflops"], final["branch_off"]["gflops"]
    assert off["backbone.net"] < on["backbone.net"] and off["backbone"] < on["backbone"]
    expected_off = _vit_gflops_from_formulas(36, 192, 2)
    expected_on = _vit_gflops_from_formulas(36, 192, 2, branch=True)
    assert off["backbone.net"] == pytest.approx(expected_off, rel=0.02)
    assert on["backbone.net"] == pytest.approx(expected_on, rel=0.02)
    # ... and both reach the EventStorage (metrics.json) and the printed table.
    final_metrics = {k: v for record in _read_metrics(tiny_run.output_dir) for k, v in record.items()}
    for key in ("branch_on/bbox/AP", "branch_off/segm/AP", "branch_off/gflops/backbone", "loss_branch_l1"):
        assert key in final_metrics
    table = tiny_run.stdout.split("Softmax branch on and off:")[-1]
    assert "| on " in table and "| off " in table and "bbox AP" in table and "model GFLOPs" in table


def test_training_retires_the_branch_by_its_end_iteration(tiny_run):
    metrics = _read_metrics(tiny_run.output_dir)
    scales = [(r["iteration"], r["branch/scale"]) for r in metrics if "branch/scale" in r]
    assert scales[-1] == (5, 0.0)
    # The kept mass was last logged at iteration 2: from 3 on the branch is not computed.
    logged_at = [r["iteration"] for r in metrics if "branch/mass/block0" in r]
    assert logged_at and max(logged_at) == 2


def test_training_logs_to_tensorboard_and_prints_an_eta_line(tiny_run):
    # Detectron2's writers, as DefaultTrainer.build_writers makes them: TensorBoard events with the
    # losses, the branch statistics and the switch hook's AP; CommonMetricPrinter's progress line.
    tags = set()
    for events in tiny_run.output_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("total_loss", "loss_cls", "loss_mask", "loss_branch_l1", "branch/scale",
                "branch/mass/block0", "branch/share/block1", "branch_on/bbox/AP", "branch_off/segm/AP"):
        assert tag in tags, tag
    log = (tiny_run.output_dir / "log.txt").read_text()
    assert re.search(r"eta: \d+:\d\d:\d\d +iter: 5 +total_loss: ", log), log[-2000:]


def test_trainer_leaves_the_model_with_the_branch_off(tmp_path):
    """README: "After training the model is left with the branch off". The schedule keeps the
    branch at full scale to the end (ANNEAL_START = ANNEAL_END = 1), so it is the switch hook, not
    the annealing, that turns it off."""
    (train_json, train_dir), _ = make_shapes_dataset(
        tmp_path / "data", num_train=4, num_val=1, image_size=96, seed=6
    ).values()
    register_coco_dataset("branch_left_off_train", str(train_json), str(train_dir))
    cfg = load_castling_config(str(SHAPES_CONFIG), [
        *TINY_RUN_OPTS, "DATASETS.TRAIN", ("branch_left_off_train",), "DATASETS.TEST", (),
        "TEST.FLOPS_NUM_IMAGES", 0, "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", str(tmp_path / "run"),
        "MODEL.CASTLING.BRANCH.ANNEAL_START", 1.0, "MODEL.CASTLING.BRANCH.ANNEAL_END", 1.0,
    ])
    trainer = CastlingTrainer(cfg)
    trainer.resume_or_load(resume=False)
    attentions = branch_modules(unwrap_model(trainer.model))
    assert len(attentions) == 2 and all(m.softmax_branch for m in attentions)
    trainer.train()
    assert trainer.storage.history("branch/mass/block0").values()  # the branch ran in training
    assert all(m.branch_scale == 1.0 for m in attentions)
    assert [(m.softmax_branch, m.branch_at_inference) for m in attentions] == [(False, False)] * 2
    trainer.model.train()
    assert not any(m.branch_active for m in attentions)  # off in training mode too


def test_eval_only_defaults_to_the_branch_off(tiny_run, shapes):
    weights = tiny_run.output_dir / "model_final.pth"
    off = _train_net(
        "--config-file", SHAPES_CONFIG, *shapes, "--eval-only", "OUTPUT_DIR", tiny_run.output_dir,
        "MODEL.WEIGHTS", weights, *TINY_RUN_OPTS,
    )
    both = _train_net(
        "--config-file", SHAPES_CONFIG, *shapes, "--eval-only", "--softmax-branch", "both",
        "OUTPUT_DIR", tiny_run.output_dir, "MODEL.WEIGHTS", weights, *TINY_RUN_OPTS,
    )
    off_table = off.stdout.split("Softmax branch on and off:")[-1]
    both_table = both.stdout.split("Softmax branch on and off:")[-1]
    assert "| off " in off_table and "| on " not in off_table
    assert "| off " in both_table and "| on " in both_table


def test_resume_continues_from_the_last_checkpoint(tiny_run, shapes):
    result = _train_net(
        "--config-file", SHAPES_CONFIG, *shapes, "--resume", "OUTPUT_DIR", tiny_run.output_dir,
        *TINY_RUN_OPTS, "SOLVER.MAX_ITER", 8, "TEST.EVAL_PERIOD", 0,
    )
    log = result.stdout + result.stderr
    assert "Starting training from iteration 6" in log
    # The last record holds the final evaluation, written at iteration MAX_ITER.
    assert _read_metrics(tiny_run.output_dir)[-1]["iteration"] == 8


# tools/train_net.py's command, with each rank saving its model's state at the start and at the
# end of training. The patch is at the script's top level, which every worker that launch() spawns
# runs again (as __mp_main__).
PER_RANK_STATES = """
import os
import torch
from detectron2.utils import comm
from castling_det.commands.train_net import run
from castling_det.engine import CastlingTrainer, unwrap_model

_train = CastlingTrainer.train

def train(self):
    state = lambda: {k: v.detach().clone() for k, v in unwrap_model(self.model).state_dict().items()}
    before = state()
    result = _train(self)
    path = os.path.join(self.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}_states.pth")
    torch.save({"before": before, "after": state()}, path)
    return result

CastlingTrainer.train = train
if __name__ == "__main__":
    run()
"""


@pytest.mark.parametrize("in_feature", ["last_feat", "block0"])
def test_two_process_gloo_training_keeps_the_ranks_weights_equal(shapes, tmp_path, in_feature):
    """Two Gloo processes train on different images, yet (DistributedDataParallel averaging the
    gradients) hold the same weights at every step: equal at the start, equal and moved at the
    end, and equal to rank 0's model_final.pth. Also with the pyramid on an intermediate block
    (DDP rejects parameters without gradient)."""
    script = tmp_path / "per_rank_states.py"
    script.write_text(PER_RANK_STATES)
    output_dir = tmp_path / "run"
    cmd = [
        sys.executable, script, "--num-gpus", 2, "--config-file", SHAPES_CONFIG, *shapes,
        "OUTPUT_DIR", output_dir, *TINY_RUN_OPTS, "SOLVER.MAX_ITER", 2, "TEST.EVAL_PERIOD", 0,
        "MODEL.FPN.IN_FEATURES", f'["{in_feature}"]',
    ]
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert _read_metrics(output_dir)[-1]["iteration"] == 2

    ranks = [torch.load(output_dir / f"rank{rank}_states.pth", weights_only=True) for rank in (0, 1)]
    final = torch.load(output_dir / "model_final.pth", weights_only=True)["model"]
    assert ranks[0]["after"].keys() == ranks[1]["after"].keys() == final.keys()
    moved = [key for key, value in ranks[0]["after"].items() if not torch.equal(value, ranks[0]["before"][key])]
    assert moved == list(final), "some weights did not change in training"
    for key, value in ranks[0]["after"].items():
        assert torch.equal(ranks[1]["before"][key], ranks[0]["before"][key]), key
        assert torch.equal(ranks[1]["after"][key], value), key
        assert torch.equal(final[key], value), key


# --------------------------------------------------------------------------------------------
# Real data sets from ../shared/datasets
# --------------------------------------------------------------------------------------------
def _first_images(annotations: Path, count: int, out: Path) -> Path:
    """A copy of a COCO annotation file keeping its first ``count`` images (and their boxes)."""
    data = json.loads(annotations.read_text())
    data["images"] = data["images"][:count]
    kept = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    out.write_text(json.dumps(data))
    return out


@pytest.mark.skipif(not (SHARED / "coco_tiny").is_dir(), reason="../shared/datasets/coco_tiny absent")
def test_training_and_evaluation_on_coco_tiny(tmp_path):
    root = SHARED / "coco_tiny"
    annotations = root / "annotations"
    # Real COCO images and annotations; evaluated on 8 of the 50 val images, twice (branch on, off).
    val = _first_images(annotations / "instances_val2017.json", 8, tmp_path / "val8.json")
    result = _train_net(
        "--config-file", REPO / "configs/COCO-Detection/faster_rcnn_castling_vit_s_fpn_3x.yaml",
        "--register-coco", "coco_tiny_train", annotations / "instances_train2017.json", root / "train2017",
        "--register-coco", "coco_tiny_val8", val, root / "val2017",
        "DATASETS.TRAIN", "('coco_tiny_train',)", "DATASETS.TEST", "('coco_tiny_val8',)",
        "OUTPUT_DIR", tmp_path / "run", "SOLVER.MAX_ITER", 4, "SOLVER.IMS_PER_BATCH", 2,
        "MODEL.CASTLING.DEPTH", 2, "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", 224,
        "INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 224, "DATALOADER.NUM_WORKERS", 0,
        "TEST.FLOPS_NUM_IMAGES", 1, "TEST.DETECTIONS_PER_IMAGE", 5, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,  # RoIAlign's backward on CPU is single-threaded
    )
    assert _read_metrics(tmp_path / "run")[-1]["iteration"] == 4
    assert "Start inference on 8 batches" in result.stdout + result.stderr
    assert "| on " in result.stdout and "| off " in result.stdout


@pytest.mark.skipif(not (SHARED / "bccd").is_dir(), reason="../shared/datasets/bccd absent")
def test_voc_registration_reads_bccd():
    register_voc_dataset("test_bccd_val", str(SHARED / "bccd"), "val", ["RBC", "WBC", "Platelets"])
    records = DatasetCatalog.get("test_bccd_val")
    assert len(records) == 87
    assert MetadataCatalog.get("test_bccd_val").thing_classes == ["RBC", "WBC", "Platelets"]
    classes = {ann["category_id"] for record in records for ann in record["annotations"]}
    assert classes == {0, 1, 2}


def test_registration_names_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        register_voc_dataset("test_missing_voc", str(tmp_path), "train", ["a"])
