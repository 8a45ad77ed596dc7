"""Measurement: FLOP counting that includes attention."""
from .flops import ATTENTION_FLOP_HANDLES, count_gflops, sdpa_flop_jit

__all__ = ["ATTENTION_FLOP_HANDLES", "count_gflops", "sdpa_flop_jit"]
