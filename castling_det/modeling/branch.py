"""Switching and scaling the auxiliary softmax branch of every linear-angular attention in a model."""
from contextlib import contextmanager
from typing import Iterator, List

from torch import nn

from .attention import LinearAngularAttention

__all__ = [
    "any_branch_active",
    "branch_modules",
    "set_branch_scale",
    "set_softmax_branch",
    "softmax_branch",
]


def branch_modules(model: nn.Module) -> List[LinearAngularAttention]:
    """The :class:`LinearAngularAttention` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, LinearAngularAttention)]


def any_branch_active(model: nn.Module) -> bool:
    """Whether the next forward of ``model`` computes the softmax branch in any block."""
    return any(m.branch_active for m in branch_modules(model))


def set_softmax_branch(model: nn.Module, on: bool) -> int:
    """Turn the softmax branch of every :class:`LinearAngularAttention` in ``model`` on or off,
    in training and in eval mode alike (a model that was only built runs it in training only).

    Returns:
        The number of attention modules switched (0 for a model without any).
    """
    modules = branch_modules(model)
    for module in modules:
        module.softmax_branch = bool(on)
        module.branch_at_inference = bool(on)
    return len(modules)


def set_branch_scale(model: nn.Module, scale: float) -> int:
    """Set the factor the branch output is multiplied by, in every module (0 skips the branch).

    Returns:
        The number of attention modules changed.
    """
    if scale < 0:
        raise ValueError(f"branch scale {scale} must be >= 0")
    modules = branch_modules(model)
    for module in modules:
        module.branch_scale = float(scale)
    return len(modules)


@contextmanager
def softmax_branch(model: nn.Module, on: bool, scale: float = None) -> Iterator[nn.Module]:
    """Context manager: the branch is ``on`` inside, in eval mode too (at ``scale`` if given);
    each module's own settings and scale are restored after.

    Example::

        with softmax_branch(model, False):
            outputs = model(inputs)  # evaluated as deployed: linear in the token count
    """
    modules = branch_modules(model)
    previous = [(m.softmax_branch, m.branch_at_inference, m.branch_scale) for m in modules]
    set_softmax_branch(model, on)
    if scale is not None:
        set_branch_scale(model, scale)
    try:
        yield model
    finally:
        for module, (state, at_inference, old_scale) in zip(modules, previous):
            module.softmax_branch = state
            module.branch_at_inference = at_inference
            module.branch_scale = old_scale
