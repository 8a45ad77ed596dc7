"""Optimizer from a yacs config: Detectron2's SGD, or AdamW (the usual choice for ViTs)."""
import torch
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("SGD", "ADAMW")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.SOLVER.OPTIMIZER``.

    ``"SGD"`` is Detectron2's own; ``"ADAMW"`` uses the same ``SOLVER.*`` keys for learning rate,
    weight decay (``WEIGHT_DECAY_NORM`` for norm layers, ``WEIGHT_DECAY_BIAS`` for biases) and
    gradient clipping (``SOLVER.CLIP_GRADIENTS``).
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not one of {list(OPTIMIZERS)}")
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999))
    return maybe_add_gradient_clipping(cfg, optimizer)
