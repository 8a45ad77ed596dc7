"""Outside training, the model is the deployed (linear) one by default, however it is built:
the softmax branch runs in training, and in eval mode only when switched on explicitly."""
import numpy as np
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from castling_det import CastlingViT, LinearAngularAttention, set_softmax_branch, softmax_branch
from conftest import detection_batch, largest_output

SIDE = 1024  # 64 x 64 = 4096 tokens: N x N scores are larger than any other tensor here
NUM_TOKENS = (SIDE // 16) ** 2


def _big_image_cfg(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN", mask_on=True)
    assert cfg.MODEL.CASTLING.BRANCH.ENABLED  # the default: the branch is used in training
    cfg.MODEL.CASTLING.BRANCH.CHUNK_SIZE = 0  # unchunked, so a running branch forms N x N
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = SIDE
    return cfg


def test_default_predictor_is_linear_in_the_token_count(make_detector_cfg):
    predictor = DefaultPredictor(_big_image_cfg(make_detector_cfg))
    image = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    numel, shape = largest_output(predictor, image)
    assert numel < NUM_TOKENS * NUM_TOKENS, f"inference formed a tensor of shape {shape}"

    # positive control: switched on explicitly, the branch does run at inference
    set_softmax_branch(predictor.model, True)
    numel_on, shape_on = largest_output(predictor, image)
    assert numel_on >= NUM_TOKENS * NUM_TOKENS, shape_on


def test_build_model_eval_equals_the_branch_off_and_training_uses_the_branch(make_detector_cfg):
    cfg = make_detector_cfg("GeneralizedRCNN")
    model = build_model(cfg)
    with torch.no_grad():  # sharper softmax, so that a running branch changes the output
        for module in model.modules():
            if isinstance(module, LinearAngularAttention):
                module.qkv.weight.normal_(0.0, 0.3)
    images = torch.randn(1, 3, 96, 128)
    vit = model.backbone.net
    model.eval()
    with torch.no_grad():
        as_built = vit(images)["last_feat"]
        with softmax_branch(model, False):
            off = vit(images)["last_feat"]
        with softmax_branch(model, True):
            on = vit(images)["last_feat"]
    assert torch.equal(as_built, off)
    assert (on - off).abs().max() > 1e-3

    model.train()
    with EventStorage(0):  # the R-CNN heads log training statistics
        losses = model(detection_batch())
    attentions = [m for m in model.modules() if isinstance(m, LinearAngularAttention)]
    assert attentions and all(m.branch_stats is not None for m in attentions)
    assert torch.isfinite(sum(losses.values()))


def test_lazy_instantiated_backbone_is_linear_in_eval_mode():
    vit = instantiate(
        L(CastlingViT)(embed_dim=64, depth=2, num_heads=2, conv_kind="grid", conv_kernel_size=3,
                       branch_chunk_size=None)
    ).eval()
    numel, shape = largest_output(vit, torch.randn(1, 3, SIDE, SIDE))
    assert numel < NUM_TOKENS * NUM_TOKENS, shape
    with softmax_branch(vit, True):
        numel_on, _ = largest_output(vit, torch.randn(1, 3, SIDE, SIDE))
    assert numel_on >= NUM_TOKENS * NUM_TOKENS
