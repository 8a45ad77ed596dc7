"""Switching the auxiliary softmax branch of every linear-angular attention in a model."""
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .attention import LinearAngularAttention

__all__ = ["set_softmax_branch", "softmax_branch"]


def set_softmax_branch(model: nn.Module, on: bool) -> int:
    """Turn the softmax branch of every :class:`LinearAngularAttention` in ``model`` on or off.

    Returns:
        The number of attention modules switched (0 for a model without any).
    """
    modules = [m for m in model.modules() if isinstance(m, LinearAngularAttention)]
    for module in modules:
        module.softmax_branch = bool(on)
    return len(modules)


@contextmanager
def softmax_branch(model: nn.Module, on: bool) -> Iterator[nn.Module]:
    """Context manager: the branch is ``on`` inside; each module's own setting is restored after.

    Example::

        with softmax_branch(model, False):
            outputs = model(inputs)  # evaluated as deployed: linear in the token count
    """
    modules = [m for m in model.modules() if isinstance(m, LinearAngularAttention)]
    previous = [m.softmax_branch for m in modules]
    for module in modules:
        module.softmax_branch = bool(on)
    try:
        yield model
    finally:
        for module, state in zip(modules, previous):
            module.softmax_branch = state
