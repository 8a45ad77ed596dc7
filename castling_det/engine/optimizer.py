"""Optimizer from a yacs config, with ViTDet's recipe for ViT backbones.

Layer-wise learning-rate decay (``SOLVER.LR_DECAY_RATE``: block i of a depth-L ViT gets
``rate^(L - i)`` of the learning rate, the patch and position embeddings ``rate^(L + 1)``), no
weight decay on norms (``SOLVER.WEIGHT_DECAY_NORM``), biases (``SOLVER.WEIGHT_DECAY_BIAS``), the
position embedding and the learned linear-term weights of linear-angular attention, and gradient
clipping (``SOLVER.CLIP_GRADIENTS``), where ``CLIP_TYPE: "full_model"`` clips the norm of all
gradients together, besides Detectron2's per-parameter ``"value"`` and ``"norm"``.
"""
from functools import partial

import torch
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..modeling.backbone import CastlingViT

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("SGD", "ADAMW")


def _lr_factor_func(cfg, model: torch.nn.Module):
    rate = cfg.SOLVER.LR_DECAY_RATE
    if not 0 < rate <= 1:
        raise ValueError(f"SOLVER.LR_DECAY_RATE={rate} must be in (0, 1]")
    vits = [m for m in model.modules() if isinstance(m, CastlingViT)]
    if rate == 1 or not vits:
        return None
    return partial(get_vit_lr_decay_rate, lr_decay_rate=rate, num_layers=len(vits[0].blocks))


def _clip_full_model(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.optim.Optimizer:
    """Make ``optimizer.step`` first clip the global norm of all its gradients to ``max_norm``."""
    base = type(optimizer)

    class FullModelClipping(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelClipping.__name__ = f"{base.__name__}WithFullModelClipping"
    optimizer.__class__ = FullModelClipping
    return optimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.SOLVER.OPTIMIZER`` (``"SGD"`` or ``"ADAMW"``)."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not one of {list(OPTIMIZERS)}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=_lr_factor_func(cfg, model),
        # Decay would pull the learned linear-term weight towards 0 (attention towards 0.5·v).
        overrides={"pos_embed": {"weight_decay": 0.0}, "linear_weight": {"weight_decay": 0.0}},
    )
    if name == "SGD":
        optimizer = torch.optim.SGD(
            params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999))
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _clip_full_model(optimizer, clip.CLIP_VALUE)
    return maybe_add_gradient_clipping(cfg, optimizer)
