"""Faster R-CNN, Mask R-CNN and RetinaNet on Castling-ViT, built by Detectron2's ``build_model``.

One training step and one inference step on a 2-image batch of different sizes, neither a
multiple of 32.
"""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import castling_det
from conftest import IMAGE_SIZES, detection_batch
from castling_det import CastlingFPN, LinearAngularAttention


DETECTORS = {
    # id: (meta architecture, mask_on, expected loss names)
    "faster_rcnn": (
        "GeneralizedRCNN", False, {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    ),
    "mask_rcnn": (
        "GeneralizedRCNN", True,
        {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"},
    ),
    "retinanet": ("RetinaNet", False, {"loss_cls", "loss_box_reg"}),
}


def _castling_modules(model):
    return [m for m in model.modules() if isinstance(m, LinearAngularAttention)]


CASES = [
    pytest.param("faster_rcnn", None, id="faster_rcnn"),
    pytest.param("mask_rcnn", "polygon", id="mask_rcnn_polygons"),
    pytest.param("mask_rcnn", "bitmask", id="mask_rcnn_bitmasks"),
    pytest.param("retinanet", None, id="retinanet"),
]


@pytest.mark.parametrize("detector,mask_kind", CASES)
def test_train_and_inference_step(make_detector_cfg, detector, mask_kind):
    meta_arch, mask_on, loss_names = DETECTORS[detector]
    cfg = make_detector_cfg(meta_arch, mask_on=mask_on)
    torch.manual_seed(0)
    model = build_model(cfg)

    assert type(model).__name__ == meta_arch
    assert isinstance(model.backbone, CastlingFPN)
    assert len(_castling_modules(model)) == cfg.MODEL.CASTLING.DEPTH
    assert model.backbone.size_divisibility == 32

    # ---- one training step
    model.train()
    batch = detection_batch(mask_kind)
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == loss_names
    for name, value in losses.items():
        assert isinstance(value, torch.Tensor), name
        assert value.dim() == 0, name
        assert torch.isfinite(value), f"{name} = {value}"
    total = sum(losses.values())
    assert total.item() > 0
    total.backward()

    attn = model.backbone.net.blocks[0].attn
    assert isinstance(attn, LinearAngularAttention)
    for param in (attn.qkv.weight, attn.dwconv.weight, model.backbone.net.patch_embed.proj.weight):
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()
        assert param.grad.abs().sum().item() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)

    # ---- one inference step, deployed as in the paper: softmax branch off
    model.eval()
    with torch.no_grad(), castling_det.softmax_branch(model, False):
        outputs = model(detection_batch())
    assert all(m.softmax_branch for m in _castling_modules(model))  # restored after the block
    assert isinstance(outputs, list) and len(outputs) == 2
    for output, (height, width) in zip(outputs, IMAGE_SIZES):
        assert set(output) >= {"instances"}
        instances = output["instances"]
        assert instances.image_size == (height, width)
        assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
        for field in ("pred_boxes", "scores", "pred_classes"):
            assert instances.has(field), field
        boxes = instances.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < 3)).all()
        assert torch.isfinite(instances.scores).all()
        if mask_on:
            assert instances.has("pred_masks")
            assert instances.pred_masks.shape == (len(instances), height, width)
        else:
            assert not instances.has("pred_masks")


def test_inference_pads_the_batch_to_the_pyramid_stride(make_detector_cfg):
    """The detector pads its 120x150 / 100x90 batch to 128x160, so p2..p6 are exact halvings."""
    cfg = make_detector_cfg("GeneralizedRCNN")
    model = build_model(cfg).eval()
    images = model.preprocess_image(detection_batch())
    assert images.tensor.shape == (2, 3, 128, 160)
    assert images.image_sizes == IMAGE_SIZES
    with torch.no_grad():
        features = model.backbone(images.tensor)
    sizes = {name: tuple(f.shape[-2:]) for name, f in features.items()}
    assert sizes == {
        "p2": (32, 40), "p3": (16, 20), "p4": (8, 10), "p5": (4, 5),
        "p6": (math.ceil(4 / 2), math.ceil(5 / 2)),
    }


def test_inference_with_branch_on_and_off_differs(make_detector_cfg):
    """Switching the branch changes what the detector sees (the switch reaches the backbone)."""
    cfg = make_detector_cfg("RetinaNet")
    model = build_model(cfg).eval()
    castling_det.set_softmax_branch(model, True)  # in eval mode the branch runs only when asked
    with torch.no_grad():
        for module in _castling_modules(model):
            module.qkv.weight.normal_(0.0, 0.2)
        images = model.preprocess_image(detection_batch())
        on = model.backbone(images.tensor)
        with castling_det.softmax_branch(model, False):
            off = model.backbone(images.tensor)
        on_again = model.backbone(images.tensor)
    assert set(on) == {"p3", "p4", "p5", "p6", "p7"}
    assert max((on[k] - off[k]).abs().max().item() for k in on) > 1e-3
    assert all(torch.equal(on[k], on_again[k]) for k in on)


def test_lazyconfig_vitdet_mask_rcnn_with_castling_backbone():
    """The model classes take plain keyword arguments, so LazyConfig builds them as they are:
    Detectron2's own ViTDet Mask R-CNN config with its backbone swapped for Castling-ViT."""
    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    model_cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    model_cfg.backbone = L(CastlingFPN)(
        net=L(castling_det.CastlingViT)(embed_dim=64, depth=2, num_heads=2, conv_kind="grid",
                                        conv_kernel_size=3),
        in_feature="last_feat",
        out_channels=256,  # what the config's heads are laid out for
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=L(LastLevelMaxPool)(),
        norm="LN",
    )
    model_cfg.roi_heads.num_classes = 3
    model = instantiate(model_cfg)
    assert isinstance(model.backbone.net, castling_det.CastlingViT)
    assert len(_castling_modules(model)) == 2

    model.train()
    with EventStorage(0):
        losses = model(detection_batch("polygon"))
    assert {"loss_mask", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
