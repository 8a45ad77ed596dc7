"""Tests of attention transfer ("switching" a softmax twin to Castling-ViT)."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from castling_det import LinearAngularAttention
from castling_det.data import make_shapes_dataset
from castling_det.engine.attention_transfer import (
    AttentionTransfer,
    attention_transfer_loss,
    build_attention_transfer,
    build_teacher_attentions,
    load_model_state,
    zero_missing_convolutions,
)
from castling_det.engine.checkpoint import CastlingCheckpointer
from conftest import detection_batch

REPO = Path(__file__).resolve().parents[1]


def _twins(make_detector_cfg):
    """A tiny softmax-twin detector and a Castling detector of the same shape."""
    cfg = make_detector_cfg("GeneralizedRCNN")
    softmax_cfg = cfg.clone()
    softmax_cfg.MODEL.CASTLING.ATTN_KINDS = ["softmax"]
    return build_model(softmax_cfg), build_model(cfg)


def test_loss_is_zero_for_equal_outputs_and_its_gradient_reaches_only_the_student():
    teacher = torch.randn(2, 4, 5, 8, requires_grad=True)
    student = teacher.detach().clone().requires_grad_()
    assert attention_transfer_loss(student, teacher).item() == 0.0

    student = (teacher.detach() + 0.1 * torch.randn(2, 4, 5, 8)).requires_grad_()
    loss = attention_transfer_loss(student, teacher)
    expected = ((student - teacher) ** 2).sum() / (teacher**2).sum()
    assert loss.item() == pytest.approx(expected.item()) and loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # scale-free: both outputs 10x larger give the same loss
    assert attention_transfer_loss(10 * student, 10 * teacher).item() == pytest.approx(loss.item())


def test_teachers_compute_the_softmax_twins_attention(make_detector_cfg):
    softmax_model, castling_model = _twins(make_detector_cfg)
    teachers = build_teacher_attentions(castling_model, softmax_model.state_dict())
    assert sorted(teachers) == [f"backbone.net.blocks.{i}.attn" for i in range(2)]
    x = torch.randn(1, 6, 7, 64)
    for index, block in enumerate(softmax_model.backbone.net.blocks):
        teacher = teachers[f"backbone.net.blocks.{index}.attn"]
        torch.testing.assert_close(teacher(x), block.attn(x))
        assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_checkpoint_without_a_projection_is_named(make_detector_cfg):
    softmax_model, castling_model = _twins(make_detector_cfg)
    state = softmax_model.state_dict()
    del state["backbone.net.blocks.1.attn.proj.weight"]
    with pytest.raises(ValueError, match=re.escape("backbone.net.blocks.1.attn.proj.weight")):
        build_teacher_attentions(castling_model, state)


def test_switching_loads_every_tensor_of_the_softmax_twin(make_detector_cfg, tmp_path, caplog):
    softmax_model, castling_model = _twins(make_detector_cfg)
    path = tmp_path / "softmax_twin.pth"
    torch.save({"model": softmax_model.state_dict(), "iteration": 99}, path)

    with caplog.at_level(logging.INFO, logger="castling_det"):
        CastlingCheckpointer(castling_model).load(str(path), checkpointables=[])
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded "))
    total = len(castling_model.state_dict())
    # Only the two depthwise convolutions are new; nothing is left over or of another shape.
    assert report.startswith(f"Loaded {total - 2} of {total} model tensors; 2 missing from the checkpoint, "
                             "0 of another shape, 0 in the checkpoint unused")
    castling_state = castling_model.state_dict()
    for key, tensor in softmax_model.state_dict().items():
        assert torch.equal(castling_state[key], tensor), key

    assert zero_missing_convolutions(castling_model, load_model_state(str(path))) == 2
    for block in castling_model.backbone.net.blocks:
        assert block.attn.dwconv.weight.abs().sum() == 0


def test_missing_teacher_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_model_state(str(tmp_path / "nowhere.pth"))


def test_hook_adds_the_loss_only_before_its_end(make_detector_cfg):
    softmax_model, castling_model = _twins(make_detector_cfg)
    castling_model.load_state_dict(softmax_model.state_dict(), strict=False)
    teachers = build_teacher_attentions(castling_model, softmax_model.state_dict())
    hook = AttentionTransfer(castling_model, teachers, loss_weight=0.5, end_iter=2)

    # An independent record of each student attention's input and output.
    seen = []
    for module in castling_model.modules():
        if isinstance(module, LinearAngularAttention):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out)))
    twin_blocks = softmax_model.backbone.net.blocks
    castling_model.train()
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        present = []
        for iteration in range(3):
            hook.trainer.iter = iteration
            seen.clear()
            hook.before_step()
            losses = castling_model(detection_batch())
            present.append("loss_attn_transfer" in losses)
            if iteration == 0:
                per_block = []
                for (x, out), twin_block in zip(seen, twin_blocks):
                    with torch.no_grad():
                        target = twin_block.attn(x)
                    per_block.append(((out - target) ** 2).sum() / (target**2).sum())
                expected = 0.5 * torch.stack(per_block).mean()
                assert losses["loss_attn_transfer"].item() == pytest.approx(expected.item(), rel=1e-5)
                assert expected.item() > 0  # linear-angular attention is not softmax attention
                losses["loss_attn_transfer"].backward()
                qkv = castling_model.backbone.net.blocks[0].attn.qkv.weight
                assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    assert present == [True, True, False]


@pytest.mark.parametrize(
    "opts, message",
    [
        ([], "needs MODEL.WEIGHTS"),
        (["MODEL.CASTLING.TRANSFER.END", "1.5"], "MODEL.CASTLING.TRANSFER.END"),
        (["MODEL.WEIGHTS", "/nonexistent/softmax_twin.pth"], "softmax_twin.pth"),
    ],
)
def test_bad_transfer_settings_are_named(make_detector_cfg, opts, message):
    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.merge_from_list(["MODEL.CASTLING.TRANSFER.LOSS_WEIGHT", 1.0, *opts])
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        build_attention_transfer(cfg, build_model(cfg))


def test_transfer_is_off_by_default(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN")
    assert build_attention_transfer(cfg, build_model(cfg)) == (None, None)


def test_switching_run_end_to_end(tmp_path):
    """tools/train_net.py: a softmax twin, then Castling switched from its checkpoint."""
    splits = make_shapes_dataset(tmp_path / "shapes", num_train=6, num_val=2, image_size=96, seed=3)
    data = []
    for name in ("train", "val"):
        json_file, image_dir = splits[name]
        data += ["--register-coco", f"shapes_{name}", json_file, image_dir]
    common = [
        "--config-file", REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml", *data,
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.CASTLING.DEPTH", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "TEST.FLOPS_NUM_IMAGES", "1", "SOLVER.MAX_ITER", "4",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
    ]

    def train(output_dir, *opts):
        cmd = [sys.executable, REPO / "tools/train_net.py", *common, "OUTPUT_DIR", output_dir, *opts]
        result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout + result.stderr

    train(tmp_path / "softmax", "MODEL.CASTLING.ATTN_KINDS", '["softmax"]')
    log = train(
        tmp_path / "switched", "MODEL.WEIGHTS", tmp_path / "softmax/model_final.pth",
        "MODEL.CASTLING.TRANSFER.LOSS_WEIGHT", "1.0", "MODEL.CASTLING.TRANSFER.END", "0.5",
        "MODEL.CASTLING.BRANCH.MASK", "relative",
    )
    assert re.search(r"2 missing from the checkpoint, 0 of another shape, 0 in the checkpoint unused", log)
    assert "2 depthwise convolutions start at zero" in log
    records = [json.loads(line) for line in (tmp_path / "switched/metrics.json").read_text().splitlines()]
    with_loss = [r["iteration"] for r in records if "loss_attn_transfer" in r]
    assert with_loss and max(with_loss) < 2  # only during the first half of the 4 iterations
