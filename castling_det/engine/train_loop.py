"""Training loops of :class:`CastlingTrainer`: Detectron2's, with non-finite losses named, and an
autocast loop that also runs on the CPU (Detectron2's ``AMPTrainer`` requires CUDA)."""
import math
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = [
    "AutocastTrainer", "CheckedAMPTrainer", "CheckedSimpleTrainer", "build_train_loop", "make_train_loop",
]

AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def non_finite_terms(loss_dict) -> dict:
    """The terms of ``loss_dict`` whose value is NaN or infinite, as ``{name: float}``."""
    values = {name: float(loss.detach()) for name, loss in loss_dict.items()}
    return {name: value for name, value in values.items() if not math.isfinite(value)}


class _NamesNonFiniteLosses:
    """Mixin for Detectron2's training loops: stop at the first non-finite loss term, naming it.

    Detectron2 checks only the sum, on the main process and every ``gather_metric_period``
    iterations; this checks every term on every process before the optimizer step, so the
    weights are never updated from a NaN gradient.
    """

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        iteration = self.iter if iter is None else iter
        bad = non_finite_terms(loss_dict)
        if bad:
            named = ", ".join(f"{name}={value}" for name, value in bad.items())
            finite = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items() if k not in bad)
            raise FloatingPointError(
                f"Loss is not finite at iteration {iteration}: {named} (finite terms: {finite or 'none'})"
            )
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class CheckedSimpleTrainer(_NamesNonFiniteLosses, SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` that names non-finite loss terms."""


class CheckedAMPTrainer(_NamesNonFiniteLosses, AMPTrainer):
    """Detectron2's ``AMPTrainer`` (CUDA float16 with gradient scaling) that names non-finite loss terms."""


class AutocastTrainer(_NamesNonFiniteLosses, SimpleTrainer):
    """``SimpleTrainer`` with the forward pass under ``torch.autocast(device_type, dtype)``.

    No gradient scaling: bfloat16 has float32's exponent range, so gradients do not underflow.
    Used for bfloat16 on any device (the CPU included).
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str, dtype: torch.dtype):
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        """One step of SimpleTrainer's loop, the forward pass under autocast."""
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        # The losses are summed in float32, whatever precision produced them.
        losses = sum(loss.float() for loss in loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The training loop ``cfg.SOLVER.AMP`` asks for (see :func:`make_train_loop`)."""
    amp_dtype = cfg.SOLVER.AMP.DTYPE if cfg.SOLVER.AMP.ENABLED else None
    return make_train_loop(model, data_loader, optimizer, amp_dtype=amp_dtype, dtype_key="SOLVER.AMP.DTYPE")


def make_train_loop(model, data_loader, optimizer, *, amp_dtype=None, dtype_key="amp dtype") -> SimpleTrainer:
    """A training loop that names non-finite loss terms.

    ``amp_dtype`` None: :class:`CheckedSimpleTrainer`. "float16": :class:`CheckedAMPTrainer`
    (CUDA only, as float16 needs gradient scaling). "bfloat16": :class:`AutocastTrainer` on the
    model's device. ``dtype_key`` names the setting in errors.
    """
    if amp_dtype is None:
        return CheckedSimpleTrainer(model, data_loader, optimizer)
    if amp_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"{dtype_key}={amp_dtype!r} must be one of {sorted(AUTOCAST_DTYPES)}")
    device_type = next(model.parameters()).device.type
    if amp_dtype == "float16":
        if device_type != "cuda":
            raise ValueError(
                f"{dtype_key}='float16' needs CUDA (gradient scaling); the model is on {device_type!r}: "
                "use 'bfloat16'"
            )
        return CheckedAMPTrainer(model, data_loader, optimizer, precision=torch.float16)
    return AutocastTrainer(model, data_loader, optimizer, device_type=device_type, dtype=torch.bfloat16)
