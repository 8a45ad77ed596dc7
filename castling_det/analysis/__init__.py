"""Measurement: FLOP counting that includes attention; latency and peak memory."""
from .flops import ATTENTION_FLOP_HANDLES, count_gflops, sdpa_flop_jit
from .timing import median_latency_ms, peak_memory_mib

__all__ = ["ATTENTION_FLOP_HANDLES", "count_gflops", "median_latency_ms", "peak_memory_mib", "sdpa_flop_jit"]
