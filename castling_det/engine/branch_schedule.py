"""Retiring Castling-ViT's auxiliary softmax branch during training.

The paper says only that the masks of the softmax branch are "regularized to gradually become
zeros"; this is castling_det's design, set by ``MODEL.CASTLING.BRANCH.*``. Two mechanisms, both
pure functions of the iteration (so ``--resume`` continues them exactly):

1. **L1 penalty on the kept softmax mass.** ``loss_branch_l1 = w(t) · mean over blocks of
   Σⱼ A_ij·[A_ij > threshold]`` (averaged over queries; in [0, 1]). ``w`` rises linearly from 0 to
   ``L1_WEIGHT`` over the first ``L1_RAMP_END`` of training, then stays. Once every softmax weight
   is at or below the threshold the mask is empty and the branch adds exactly nothing. The model
   can get there without touching the linear path, which sees only the directions q̂, k̂: flattening
   the softmax (smaller ``q·k``) is free for it. This is for the paper's absolute mask; with the
   default relative mask, which keeps mass at any softmax, ``L1_WEIGHT`` is 0 and the annealing
   alone retires the branch.
2. **Scale annealing.** The branch output is multiplied by ``s(t)``: 1 until ``ANNEAL_START``,
   falling linearly to exactly 0 at ``ANNEAL_END`` (fractions of ``SOLVER.MAX_ITER``). From then on
   the branch is not computed at all, so the last part of training sees the model as deployed.

Each step logs ``branch/scale``, ``branch/l1_weight`` and, per block, ``branch/mass/block{i}``
(the kept mass) and ``branch/share/block{i}`` (the branch's share of the attention sum, by norm)
to the ``EventStorage``, hence to ``metrics.json`` and TensorBoard.
"""
import re
from dataclasses import dataclass

import torch
from detectron2.engine import HookBase
from torch import nn

from ..modeling.attention import LinearAngularAttention

__all__ = ["BranchSchedule", "BranchRegularizer"]


@dataclass(frozen=True)
class BranchSchedule:
    """The L1 weight and branch scale as functions of the iteration (fractions of ``max_iter``)."""

    max_iter: int
    l1_weight: float = 0.0  # MODEL.CASTLING.BRANCH.L1_WEIGHT's default; the paper's recipe: 1.0
    l1_ramp_end: float = 0.5
    anneal_start: float = 0.5
    anneal_end: float = 0.8

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"SOLVER.MAX_ITER={self.max_iter} must be positive")
        if self.l1_weight < 0:
            raise ValueError(f"MODEL.CASTLING.BRANCH.L1_WEIGHT={self.l1_weight} must be >= 0")
        if not 0 <= self.l1_ramp_end <= 1:
            raise ValueError(f"MODEL.CASTLING.BRANCH.L1_RAMP_END={self.l1_ramp_end} must be in [0, 1]")
        if not 0 <= self.anneal_start <= self.anneal_end <= 1:
            raise ValueError(
                "MODEL.CASTLING.BRANCH.ANNEAL_START and ANNEAL_END must satisfy "
                f"0 <= START <= END <= 1, got {self.anneal_start} and {self.anneal_end}"
            )

    @classmethod
    def from_config(cls, cfg) -> "BranchSchedule":
        branch = cfg.MODEL.CASTLING.BRANCH
        return cls(
            max_iter=cfg.SOLVER.MAX_ITER,
            l1_weight=branch.L1_WEIGHT,
            l1_ramp_end=branch.L1_RAMP_END,
            anneal_start=branch.ANNEAL_START,
            anneal_end=branch.ANNEAL_END,
        )

    def l1_weight_at(self, iteration: int) -> float:
        ramp_end = self.l1_ramp_end * self.max_iter
        if iteration >= ramp_end:
            return self.l1_weight
        return self.l1_weight * iteration / ramp_end

    def scale_at(self, iteration: int) -> float:
        start, end = self.anneal_start * self.max_iter, self.anneal_end * self.max_iter
        if iteration >= end:
            return 0.0
        if iteration <= start:
            return 1.0
        return (end - iteration) / (end - start)


def _block_label(module_name: str) -> str:
    match = re.search(r"blocks\.(\d+)\.", module_name)
    return f"block{match.group(1)}" if match else module_name


class BranchRegularizer(HookBase):
    """Applies a :class:`BranchSchedule` during training.

    Before each step it sets the branch scale of every :class:`LinearAngularAttention`; a forward
    hook on the model adds ``loss_branch_l1`` to the loss dict the model returns in training (so
    Detectron2's trainer backpropagates and logs it like any loss); after the step it logs the
    per-block statistics.
    """

    def __init__(self, model: nn.Module, schedule: BranchSchedule):
        """
        Args:
            model: the detector, not wrapped in DistributedDataParallel.
            schedule: the L1 weight and branch scale over iterations.
        """
        self._schedule = schedule
        self._modules = {
            _block_label(name): module
            for name, module in model.named_modules()
            if isinstance(module, LinearAngularAttention)
        }
        self._l1_weight = 0.0
        self._scale = 1.0
        model.register_forward_hook(self._add_branch_loss)

    def before_train(self):
        # A resumed run's modules carry the scale of the checkpoint's last step, as they did when
        # it was saved (an evaluation of that checkpoint records it).
        if self.trainer.iter > 0:
            self._apply(self.trainer.iter - 1)

    def before_step(self):
        self._apply(self.trainer.iter)

    def _apply(self, iteration: int) -> None:
        self._scale = self._schedule.scale_at(iteration)
        self._l1_weight = self._schedule.l1_weight_at(iteration)
        for module in self._modules.values():
            module.branch_scale = self._scale

    def _add_branch_loss(self, model, inputs, outputs):
        if not model.training or not isinstance(outputs, dict):
            return None
        masses = [m.branch_stats["mass"] for m in self._modules.values() if m.branch_stats]
        if not masses:
            return None
        return {**outputs, "loss_branch_l1": self._l1_weight * torch.stack(masses).mean()}

    def after_step(self):
        storage = self.trainer.storage
        storage.put_scalars(
            **{"branch/scale": self._scale, "branch/l1_weight": self._l1_weight}, smoothing_hint=False
        )
        for label, module in self._modules.items():
            if module.branch_stats:
                storage.put_scalar(f"branch/mass/{label}", module.branch_stats["mass"].item())
                storage.put_scalar(f"branch/share/{label}", module.branch_stats["share"].item())
