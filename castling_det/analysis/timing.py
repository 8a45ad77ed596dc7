"""Latency and peak memory of a callable, on CPU or CUDA, measured the same way for every model.

Latency is the median wall-clock time of repeated calls after warm-up (CUDA synchronised around
each call). Peak memory is what the call allocates on top of what existed before it: on CUDA
from the caching allocator's statistics, on CPU from the allocation records of PyTorch's
profiler (every tensor the call creates and frees, in order).
"""
import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

__all__ = ["interleaved_median_latency_ms", "median_latency_ms", "peak_memory_mib"]

MIB = 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_latency_ms(
    fns: Mapping[str, Callable[[], object]], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> Dict[str, float]:
    """Median time of each callable in milliseconds over ``repeats`` calls, after ``warmup`` calls
    of each; the timed calls are taken in turns, one of each per round, so that a drift in the
    machine's speed (other tenants of a shared host, clock changes) reaches every callable alike
    and their ratios hold."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}


def median_latency_ms(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> float:
    """Median time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    return interleaved_median_latency_ms({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory that ``fn()`` allocates beyond what was allocated before the call, in MiB."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    # The memory profiler pairs every allocation with its free; tensors that existed before the
    # call show up as PREEXISTING and are not counted. Its keys are (storage, version) pairs.
    live = peak = 0
    created = set()
    for _, action, (storage, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            created.add(storage)
            live += size
        elif action == Action.DESTROY and storage in created:
            live -= size
        peak = max(peak, live)
    return peak / MIB
