"""Where the time goes, from PyTorch's profiler: the kernel table of a call, and how each
operator's self time in a ViT grows from one input size to another."""
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .precision import autocast

__all__ = ["kernel_table", "operator_self_times_ms", "self_time_growth"]


def kernel_table(fn: Callable[[], object], device: torch.device, *, repeats: int = 10, rows: int = 15) -> str:
    """The profiler's table of the operators and kernels of ``repeats`` calls of ``fn()``, by self
    time (on the GPU for CUDA), ``rows`` rows."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def operator_self_times_ms(vit: nn.Module, size: int, device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """CPU self time in ms of each operator over one forward pass of ``vit`` on a random
    ``size``×``size`` image (under autocast to ``dtype``), after one warm-up pass."""
    image = torch.randn(1, 3, size, size, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        vit(image)
        with profile() as prof:
            vit(image)
    return {event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()}


def self_time_growth(small: Dict[str, float], large: Dict[str, float]) -> List[Tuple[str, float, float, float]]:
    """``(operator, ms at the small size, ms at the large size, their ratio)``, largest time at the
    large size first; the ratio is NaN for an operator that took no time at the small size."""
    rows = []
    for name, after in sorted(large.items(), key=lambda item: -item[1]):
        before = small.get(name, 0.0)
        rows.append((name, before, after, after / before if before > 0 else float("nan")))
    return rows
