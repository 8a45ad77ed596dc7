"""The optimizer recipe: layer-wise lr decay, weight decay by parameter kind, SGD, and clipping,
each checked against values worked out here from the config."""
import pytest
import torch
from detectron2.modeling import build_model

from castling_det.engine.optimizer import build_optimizer


def _by_param(optimizer, key):
    return {id(p): group[key] for group in optimizer.param_groups for p in group["params"]}


def _model_and_cfg(make_detector_cfg, **solver):
    cfg = make_detector_cfg("GeneralizedRCNN")
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return build_model(cfg), cfg


def test_layer_wise_lr_decay(make_detector_cfg):
    model, cfg = _model_and_cfg(make_detector_cfg, LR_DECAY_RATE=0.7)
    lr = _by_param(build_optimizer(cfg, model), "lr")
    vit = model.backbone.net
    depth = len(vit.blocks)  # 2: block i gets 0.7^(depth - i), the embeddings 0.7^(depth + 1)
    assert lr[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.01 * 0.7**2)
    assert lr[id(vit.blocks[1].mlp.fc1.weight)] == pytest.approx(0.01 * 0.7**1)
    assert lr[id(vit.pos_embed)] == pytest.approx(0.01 * 0.7 ** (depth + 1))
    assert lr[id(vit.patch_embed.proj.weight)] == pytest.approx(0.01 * 0.7 ** (depth + 1))
    # the pyramid and the heads are not ViT blocks: full rate
    assert lr[id(model.roi_heads.box_predictor.cls_score.weight)] == pytest.approx(0.01)
    assert lr[id(model.backbone.simfp_2[0].weight)] == pytest.approx(0.01)
    no_decay = _by_param(build_optimizer(_model_and_cfg(make_detector_cfg)[1], model), "lr")
    assert set(no_decay.values()) == {0.01}


def test_no_weight_decay_on_norms_and_position_embedding(make_detector_cfg):
    model, cfg = _model_and_cfg(make_detector_cfg, WEIGHT_DECAY_BIAS=0.0)
    decay = _by_param(build_optimizer(cfg, model), "weight_decay")
    block = model.backbone.net.blocks[0]
    assert decay[id(block.norm1.weight)] == 0.0 and decay[id(block.norm1.bias)] == 0.0
    assert decay[id(model.backbone.net.pos_embed)] == 0.0
    assert decay[id(block.attn.qkv.bias)] == 0.0  # SOLVER.WEIGHT_DECAY_BIAS
    assert decay[id(block.attn.qkv.weight)] == 0.05 and decay[id(block.attn.dwconv.weight)] == 0.05


def test_sgd_option(make_detector_cfg):
    model, cfg = _model_and_cfg(make_detector_cfg, OPTIMIZER="SGD", MOMENTUM=0.8, NESTEROV=True)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {(g["momentum"], g["nesterov"]) for g in optimizer.param_groups} == {(0.8, True)}
    model, cfg = _model_and_cfg(make_detector_cfg, OPTIMIZER="ADAGRAD")
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, model)


def test_full_model_clipping_bounds_the_global_gradient_norm(make_detector_cfg):
    model, cfg = _model_and_cfg(make_detector_cfg, OPTIMIZER="SGD", MOMENTUM=0.0, BASE_LR=1.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    optimizer = build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 3.0)  # global norm 3 * sqrt(#elements), far above 0.5
    optimizer.step()
    # SGD at lr 1 without momentum or decay moves each parameter by minus its (clipped) gradient
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-3)  # fp32 differences of the parameters
    assert torch.allclose(step, torch.full_like(step, step[0].item()), rtol=1e-3)  # one common scale
