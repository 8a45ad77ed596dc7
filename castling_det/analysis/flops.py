"""FLOP counting that sees attention: fvcore's trace-based counter plus the handles it lacks.

fvcore (Detectron2's counter) counts linear layers, convolutions and every ``matmul``/``@``, one
multiply-add being one FLOP, but counts ``scaled_dot_product_attention``, vector norms and GELU
as zero. The handles below count them with the same convention, so softmax, window and
linear-angular attention are compared on equal terms.
"""
import math
from typing import Any, Dict, List, Sequence

import torch
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import flop_count_table
from fvcore.nn.jit_handles import elementwise_flop_counter, get_shape
from torch import nn

__all__ = ["ATTENTION_FLOP_HANDLES", "count_gflops", "flop_table", "sdpa_flop_jit", "with_attention_handles"]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``: ``q kᵀ`` then ``A v``, per batch and head."""
    q_shape, k_shape, v_shape = (get_shape(x) for x in inputs[:3])
    *batch, num_queries, head_dim = q_shape
    num_keys, value_dim = k_shape[-2], v_shape[-1]
    return math.prod(batch) * num_queries * num_keys * (head_dim + value_dim)


ATTENTION_FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    # An L2 norm squares and adds each input element once.
    "aten::linalg_vector_norm": elementwise_flop_counter(1, 0),
    "aten::norm": elementwise_flop_counter(1, 0),
    "aten::gelu": elementwise_flop_counter(0, 1),
}


def with_attention_handles(counter):
    """``counter`` (an fvcore or Detectron2 ``FlopCountAnalysis``) counting with
    :data:`ATTENTION_FLOP_HANDLES`, quiet about the operators it still skips and the modules the
    traced call does not reach."""
    counter.set_op_handle(**ATTENTION_FLOP_HANDLES)
    return counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_gflops(
    model: nn.Module, inputs: Sequence[Dict[str, Any]], modules: Sequence[str] = ("backbone",)
) -> Dict[str, float]:
    """Mean GFLOPs (multiply-adds) of a Detectron2 model's inference over single-image inputs.

    Args:
        model: a Detectron2 model (``model(list_of_dicts)``), counted as it is in eval mode.
        inputs: dataset dicts as the test data loader gives them, each counted separately.
        modules: names of submodules to report besides the whole model (e.g. ``"backbone.net"``).

    Returns:
        ``{"model": ..., name: ... for name in modules}``, each the mean over ``inputs``.
    """
    if len(inputs) == 0:
        raise ValueError("count_gflops needs at least one input")
    was_training = model.training
    model.eval()
    totals = {name: 0.0 for name in ("model", *modules)}
    try:
        with torch.no_grad():
            for single in inputs:
                counter = with_attention_handles(FlopCountAnalysis(model, [single]))
                by_module = counter.by_module()
                totals["model"] += counter.total() / 1e9
                for name in modules:
                    # Detectron2's counter traces the model inside a TracingAdapter (".model").
                    totals[name] += by_module[f"model.{name}"] / 1e9
    finally:
        model.train(was_training)
    return {name: value / len(inputs) for name, value in totals.items()}


def flop_table(model: nn.Module, inputs: Sequence[Dict[str, Any]], max_depth: int = 4) -> str:
    """fvcore's per-module FLOP table of a Detectron2 model on the first of ``inputs``, and the mean
    total over all of them (GFLOPs, multiply-adds), attention counted.

    Args:
        model: a Detectron2 model in eval mode.
        inputs: single-image dataset dicts, each counted separately.
        max_depth: module depth of the table.
    """
    if len(inputs) == 0:
        raise ValueError("flop_table needs at least one input")
    counters = [with_attention_handles(FlopCountAnalysis(model, [single])) for single in inputs]
    mean_total = sum(c.total() for c in counters) / len(counters) / 1e9
    table = flop_count_table(counters[0], max_depth=max_depth)
    return f"{table}\nMean total over {len(inputs)} input(s): {mean_total:.6f} GFLOPs (multiply-adds)"
