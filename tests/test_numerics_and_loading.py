"""Odd image sizes, non-finite losses, reproducible and bfloat16 training, and checkpoint loading
(part of issue #7)."""
import itertools
import json
import logging
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from torch import nn

from castling_det.data import make_shapes_dataset
from castling_det.engine import CastlingCheckpointer, build_train_loop
from castling_det.engine.checkpoint import load_pickled_weights
from castling_det.engine.train_loop import CheckedSimpleTrainer
from conftest import detection_batch

REPO = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"
# Castling-ViT-Ti with one block on 64-pixel images, no test set: training only.
SMALL_RUN_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.CASTLING.DEPTH", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "DATASETS.TEST", "()",
    "TEST.FLOPS_NUM_IMAGES", "0", "SOLVER.WARMUP_ITERS", "5",
]


def _image(height, width):
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8)}


def _deployed_detector(cfg_factory, mask_on):
    """A tiny Faster/Mask R-CNN in eval mode with the softmax branch off, as deployed (the branch
    is quadratic in the token count)."""
    cfg = cfg_factory("GeneralizedRCNN", mask_on=mask_on)
    cfg.MODEL.CASTLING.BRANCH.ENABLED = False
    return build_model(cfg).eval()


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_on", [False, True])
def test_inference_on_an_image_smaller_than_a_patch(make_detector_cfg, mask_on):
    # 12 x 9 is below one 16-pixel patch, but the padding to the pyramid's size divisibility
    # (32) gives the ViT a full patch grid; the outputs are in the input's size. (The bare ViT
    # names an input below one patch: tests/test_backbone.py.)
    model = _deployed_detector(make_detector_cfg, mask_on)
    with torch.no_grad():
        (output,) = model([_image(12, 9)])
    instances = output["instances"]
    assert instances.image_size == (12, 9)
    if mask_on:
        assert instances.pred_masks.shape[1:] == (12, 9)


def test_inference_on_a_3000_by_4000_image(make_detector_cfg):
    model = _deployed_detector(make_detector_cfg, mask_on=True)
    with torch.no_grad():
        (output,) = model([_image(3000, 4000)])
    instances = output["instances"]
    assert instances.image_size == (3000, 4000)
    assert len(instances) > 0 and instances.pred_masks.shape[1:] == (3000, 4000)
    assert instances.pred_boxes.tensor[:, 2].max() <= 4000 and instances.pred_boxes.tensor[:, 3].max() <= 3000


def test_inference_on_a_batch_of_mixed_sizes(make_detector_cfg):
    model = _deployed_detector(make_detector_cfg, mask_on=True)
    sizes = [(12, 9), (120, 150), (64, 300)]
    with torch.no_grad():
        outputs = model([_image(h, w) for h, w in sizes])
    assert [output["instances"].image_size for output in outputs] == sizes
    assert [tuple(output["instances"].pred_masks.shape[1:]) for output in outputs] == sizes


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------
class _LossTurnsNaN(nn.Module):
    """The detector, but its ``loss_cls`` is NaN from the ``at``-th call on."""

    def __init__(self, model, at):
        super().__init__()
        self.model = model
        self.at = at
        self.calls = 0

    def forward(self, batch):
        losses = self.model(batch)
        if self.calls >= self.at:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        self.calls += 1
        return losses


def test_non_finite_loss_stops_training_naming_the_iteration_and_the_term(make_detector_cfg):
    model = _LossTurnsNaN(build_model(make_detector_cfg("GeneralizedRCNN")).train(), at=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = CheckedSimpleTrainer(model, itertools.repeat(detection_batch()), optimizer)
    with pytest.raises(FloatingPointError, match=r"iteration 2: loss_cls=nan \(finite terms: loss_box_reg="):
        trainer.train(0, 5)
    # The step of the NaN iteration was not taken: the weights are still finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_autocast_on_the_cpu_is_refused(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.SOLVER.AMP.ENABLED = True
    model = build_model(cfg)
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE='float16' needs CUDA.*bfloat16"):
        build_train_loop(cfg, model, [], torch.optim.SGD(model.parameters(), lr=1e-3))


def test_bfloat16_loop_runs_the_forward_pass_under_cpu_autocast(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.DTYPE = "bfloat16"
    model = build_model(cfg).train()
    dtypes = []
    # Linear layers run in bfloat16 under autocast (LayerNorms return float32).
    fc1 = model.backbone.net.blocks[0].mlp.fc1
    fc1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = build_train_loop(cfg, model, itertools.repeat(detection_batch()), optimizer)
    trainer.train(0, 2)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Training runs on the shapes data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    splits = make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, image_size=64, seed=3
    )
    train_json, train_dir = splits["train"]
    return ["--register-coco", "shapes_train", train_json, train_dir]


def _train(shapes, output_dir, *opts):
    cmd = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(SHAPES_CONFIG),
        *map(str, shapes), "OUTPUT_DIR", str(output_dir), *SMALL_RUN_OPTS, *map(str, opts),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


def _losses(records):
    """The loss terms and the iteration of each record of metrics.json."""
    keys = ("iteration", "total_loss")
    return [{k: v for k, v in record.items() if k.startswith("loss") or k in keys} for record in records]


def test_two_seeded_runs_give_the_same_losses_and_weights(shapes, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    metrics = [_train(shapes, run, "SOLVER.MAX_ITER", 10, "SEED", 7) for run in runs]
    first, second = (_losses(records) for records in metrics)
    assert first[0]["iteration"] == 9 and first[0]["total_loss"] > 0
    assert len(first) == len(second)
    for record_a, record_b in zip(first, second):  # metrics.json holds medians of the last 20 values
        assert record_a.keys() == record_b.keys() and record_a == pytest.approx(record_b, abs=1e-6)
    weights = [torch.load(run / "model_final.pth", weights_only=True)["model"] for run in runs]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][key], atol=1e-6, rtol=0, msg=key)


def test_bfloat16_autocast_training_on_the_cpu_stays_finite(shapes, tmp_path):
    records = _train(
        shapes, tmp_path, "SOLVER.MAX_ITER", 30, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16",
    )
    losses = [record for record in _losses(records) if "total_loss" in record]
    assert [record["iteration"] for record in losses] == [19, 29]
    assert all(math.isfinite(value) for record in losses for value in record.values())
    assert "loss_mask" in losses[-1]
    # The checkpoint loads back, with tensors only.
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert state["iteration"] == 29


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _Payload:
    """An object that runs code when unpickled, as a malicious checkpoint could."""

    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.fixture
def load_log(caplog):
    """The records of fvcore's and castling_det's checkpoint loggers (Detectron2's setup_logger
    may have stopped them from propagating to the root logger)."""
    names = ("fvcore.common.checkpoint", "castling_det.engine.checkpoint")
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def test_checkpoints_load_with_weights_only(make_detector_cfg, tmp_path):
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    CastlingCheckpointer(model, save_dir=str(tmp_path)).save("good", iteration=3)
    twin = build_model(make_detector_cfg("GeneralizedRCNN"))
    extra = CastlingCheckpointer(twin).load(str(tmp_path / "good.pth"))
    assert extra["iteration"] == 3
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, twin.state_dict()[key]), key

    torch.save({"model": model.state_dict(), "payload": _Payload()}, tmp_path / "bad.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        CastlingCheckpointer(twin).load(str(tmp_path / "bad.pth"))


def test_pkl_weights_load_as_numpy_arrays_without_unpickling_code(make_detector_cfg, tmp_path, capsys):
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    arrays = {key: tensor.numpy().copy() for key, tensor in model.state_dict().items()}
    with open(tmp_path / "weights.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    twin = build_model(make_detector_cfg("GeneralizedRCNN"))
    CastlingCheckpointer(twin).load(str(tmp_path / "weights.pkl"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, twin.state_dict()[key]), key

    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test", "payload": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        CastlingCheckpointer(twin).load(str(tmp_path / "bad.pkl"))
    assert "unpickled" not in capsys.readouterr().out  # the payload never ran


def test_caffe2_pkl_blobs_are_read_without_solver_state(tmp_path):
    blobs = {"conv1_w": np.ones((2, 3), np.float32), "conv1_w_momentum": np.zeros((2, 3), np.float32)}
    with open(tmp_path / "c2.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    loaded = load_pickled_weights(str(tmp_path / "c2.pkl"))
    assert set(loaded["model"]) == {"conv1_w"} and loaded["matching_heuristics"] is True
    np.testing.assert_array_equal(loaded["model"]["conv1_w"], blobs["conv1_w"])


def test_a_softmax_twin_of_another_width_and_depth_loads_with_a_report(make_detector_cfg, tmp_path, load_log):
    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.MODEL.CASTLING.ATTN_KINDS = ["softmax"]
    cfg.MODEL.CASTLING.EMBED_DIM = 96
    cfg.MODEL.CASTLING.DEPTH = 3
    twin = build_model(cfg)
    CastlingCheckpointer(twin, save_dir=str(tmp_path)).save("twin")
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    head_before = model.roi_heads.box_predictor.cls_score.weight.clone()
    CastlingCheckpointer(model).load(str(tmp_path / "twin.pth"))
    log = load_log.text
    assert "Skip loading parameter 'backbone.net.patch_embed.proj.weight'" in log  # 96 wide, not 64
    assert "backbone.net.blocks.2" in log  # the third block, unused
    assert "Loaded " in log and "of another shape" in log
    # The heads have the same shapes: they were loaded.
    twin_head = twin.roi_heads.box_predictor.cls_score.weight
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, twin_head)
    assert not torch.equal(head_before, twin_head)


def test_a_resnet_state_dict_loads_with_a_report(make_detector_cfg, tmp_path, load_log):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    CastlingCheckpointer(model).load(str(tmp_path / "resnet18.pth"))
    log = load_log.text
    num_tensors = len(model.state_dict())
    assert f"Loaded 0 of {num_tensors} model tensors" in log
    assert "not found in the checkpoint" in log and "layer4.1.conv2.weight" in log
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())
