"""Attention transfer: "switching" a trained softmax ViT detector to Castling-ViT.

Castling-ViT's authors never trained a detector from scratch; their later work trains a softmax
model first and then swaps in linear-angular attention. castling_det does that swap in one
training run (``MODEL.CASTLING.TRANSFER.*``), from a softmax twin's checkpoint (``MODEL.WEIGHTS``):

1. The Castling detector loads the whole checkpoint (every ViT, pyramid and head tensor has the
   same name and shape); the depthwise convolutions on v, which a softmax ViT has not got, start at
   zero, so each block starts as the teacher's block with its attention replaced.
2. For the first ``TRANSFER.END`` of training, each castling block's attention is also trained to
   reproduce the *teacher*: the checkpoint's own attention (q, k, v and output projections) as
   global softmax attention, frozen, applied to the same input as the student's attention.
   ``loss_attn_transfer = LOSS_WEIGHT · mean over blocks of ‖s − t‖² / ‖t‖²`` (a normalised
   MSE, so every block counts alike whatever its output scale), added to the detection losses.
   The softmax branch, on its relative mask, is the student's in-model helper meanwhile.
3. Then the detector is fine-tuned alone, with the branch annealed to zero as usual.

The teachers are rebuilt from ``MODEL.WEIGHTS`` whenever training starts or resumes, and are not
part of the model, so checkpoints hold only the student.
"""
import logging
from typing import Dict, Mapping, Optional, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils.file_io import PathManager
from torch import nn

from ..modeling.attention import LinearAngularAttention, SoftmaxAttention

__all__ = [
    "AttentionTransfer",
    "attention_transfer_loss",
    "build_attention_transfer",
    "build_teacher_attentions",
    "load_model_state",
    "zero_missing_convolutions",
]

logger = logging.getLogger(__name__)


def load_model_state(path: str) -> Dict[str, torch.Tensor]:
    """The model tensors of a Detectron2 checkpoint (``{"model": state_dict, ...}`` or a bare
    state dict), read with ``weights_only=True``.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
    """
    local_path = PathManager.get_local_path(path)
    if not PathManager.isfile(local_path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} (MODEL.WEIGHTS) does not exist")
    with open(local_path, "rb") as f:
        checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    return checkpoint.get("model", checkpoint)


def _student_attentions(model: nn.Module) -> Dict[str, LinearAngularAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearAngularAttention)}


def build_teacher_attentions(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> Dict[str, SoftmaxAttention]:
    """A frozen softmax attention for every :class:`LinearAngularAttention` of ``model``, with the
    projections stored under the same module name in ``state`` (a softmax twin's state dict).

    Raises:
        ValueError: ``model`` has no linear-angular attention, or ``state`` lacks a projection
            (naming the key) or holds one of another shape.
    """
    students = _student_attentions(model)
    if not students:
        raise ValueError(
            "attention transfer needs a model with castling blocks (MODEL.CASTLING.ATTN_KINDS)"
        )
    teachers = {}
    for name, student in students.items():
        teacher = SoftmaxAttention(
            dim=student.qkv.in_features,
            num_heads=student.num_heads,
            qkv_bias=student.qkv.bias is not None,
        )
        weights = {}
        for key in teacher.state_dict():
            source_key = f"{name}.{key}"
            if source_key not in state:
                raise ValueError(f"the teacher checkpoint has no {source_key!r}: is it the softmax twin?")
            weights[key] = state[source_key]
        try:
            teacher.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"the teacher's {name} does not fit the student's: {error}") from error
        device = student.qkv.weight.device
        teachers[name] = teacher.requires_grad_(False).eval().to(device)
    return teachers


def zero_missing_convolutions(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Zero the depthwise convolution of every castling block whose weight ``state`` lacks, so a
    block loaded from a softmax twin starts without an untrained convolution adding noise (it
    still learns: its weight's gradient does not depend on the weight).

    Returns:
        The number of convolutions zeroed.
    """
    zeroed = 0
    for name, student in _student_attentions(model).items():
        if f"{name}.dwconv.weight" not in state:
            with torch.no_grad():
                student.dwconv.weight.zero_()
            zeroed += 1
    return zeroed


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖student − teacher‖² / ‖teacher‖²``: 0 when the outputs agree, scale-free; the teacher
    is a target (no gradient flows to it)."""
    teacher = teacher.detach()
    return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)


class AttentionTransfer(HookBase):
    """Adds ``loss_attn_transfer`` to the detector's losses for the first ``end_iter`` iterations.

    A forward hook on each student attention computes its teacher's output on the same input; a
    forward hook on the model adds the weighted mean of the blocks' losses to the loss dict the
    model returns in training (logged and backpropagated like any loss).
    """

    def __init__(
        self, model: nn.Module, teachers: Dict[str, SoftmaxAttention], *, loss_weight: float, end_iter: int
    ):
        """
        Args:
            model: the detector, not wrapped in DistributedDataParallel.
            teachers: from :func:`build_teacher_attentions`, keyed by the student's module name.
            loss_weight: weight of the loss.
            end_iter: the loss applies to iterations ``[0, end_iter)``.
        """
        if loss_weight < 0:
            raise ValueError(f"MODEL.CASTLING.TRANSFER.LOSS_WEIGHT={loss_weight} must be >= 0")
        self._teachers = teachers
        self._loss_weight = loss_weight
        self._end_iter = end_iter
        self._active = False
        self._block_losses = []
        students = _student_attentions(model)
        for name, teacher in teachers.items():
            students[name].register_forward_hook(self._make_block_hook(teacher))
        model.register_forward_hook(self._add_transfer_loss)

    def _make_block_hook(self, teacher: SoftmaxAttention):
        def compare_with_teacher(student, inputs, output):
            if self._active and student.training:
                with torch.no_grad():
                    target = teacher(inputs[0])
                self._block_losses.append(attention_transfer_loss(output, target))

        return compare_with_teacher

    def before_step(self):
        self._active = self.trainer.iter < self._end_iter
        self._block_losses = []

    def _add_transfer_loss(self, model, inputs, outputs):
        if not (self._active and model.training and self._block_losses and isinstance(outputs, dict)):
            return None
        loss = self._loss_weight * torch.stack(self._block_losses).mean()
        self._block_losses = []
        return {**outputs, "loss_attn_transfer": loss}


def build_attention_transfer(cfg, model: nn.Module) -> Tuple[Optional[AttentionTransfer], Optional[dict]]:
    """The hook ``cfg.MODEL.CASTLING.TRANSFER`` asks for and the teacher checkpoint's tensors
    (for :func:`zero_missing_convolutions`), or ``(None, None)`` when transfer is off.

    Raises:
        ValueError: naming the key, for a weight < 0, an END outside [0, 1], or no MODEL.WEIGHTS.
    """
    transfer = cfg.MODEL.CASTLING.TRANSFER
    if transfer.LOSS_WEIGHT < 0:
        raise ValueError(f"MODEL.CASTLING.TRANSFER.LOSS_WEIGHT={transfer.LOSS_WEIGHT} must be >= 0")
    if transfer.LOSS_WEIGHT == 0:
        return None, None
    if not 0 <= transfer.END <= 1:
        raise ValueError(f"MODEL.CASTLING.TRANSFER.END={transfer.END} must be in [0, 1]")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.CASTLING.TRANSFER.LOSS_WEIGHT > 0 needs MODEL.WEIGHTS: the softmax twin's "
            "checkpoint whose attention is transferred"
        )
    state = load_model_state(cfg.MODEL.WEIGHTS)
    hook = AttentionTransfer(
        model,
        build_teacher_attentions(model, state),
        loss_weight=transfer.LOSS_WEIGHT,
        end_iter=round(transfer.END * cfg.SOLVER.MAX_ITER),
    )
    return hook, state
