"""Latency and peak memory of a callable, on CPU or CUDA, measured the same way for every model.

Latency is the median wall-clock time of repeated calls after warm-up (CUDA synchronised around
each call). Peak memory is what the call allocates on top of what existed before it: on CUDA
from the caching allocator's statistics, on CPU from the allocation records of PyTorch's
profiler (every tensor the call creates and frees, in order).
"""
import statistics
import time
from typing import Callable, Dict, List, Mapping, Tuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _peak_of_allocations(_cpu_allocations(prof)) / MIB


def _cpu_allocations(prof: profile) -> List[Tuple[int, int, int]]:
    """The profiler's CPU allocation records ``(time_ns, ptr, size)`` in time order, a free
    with a negative size. Read straight from the event tree: the profiler's own memory
    timeline (``_memory_profile``) rebuilds a data-flow graph of every operator first, which
    takes minutes on a detector."""
    records = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            records.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    return sorted(records)


def _peak_of_allocations(records: List[Tuple[int, int, int]]) -> int:
    """Highest sum of live bytes over ``records``, counting only blocks allocated within them:
    freeing a tensor that existed before the call does not lower the count."""
    live = peak = 0
    sizes: Dict[int, int] = {}
    for _, ptr, size in records:
        if size > 0:
            sizes[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in sizes:
            live -= sizes.pop(ptr)
    return peak
