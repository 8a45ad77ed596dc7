"""Large CPU tensors served from memory the process already holds, instead of fresh pages.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at start, raised as large
blocks are freed, up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so every such
tensor's pages are faulted in and zeroed by the kernel on first write. A ViT-B token map at 2048²
(16,384 tokens × 768 channels, 48 MiB in fp32) is above it: each pass over one writes new pages,
which measured slower than the pass itself (an fp32 add of two such maps: 21 ms, 5 ms with the
memory reused, on a 2-core Xeon). At 1024² the same maps (12 MiB) stay in glibc's heap, which is
why those passes scaled far worse than the token count from 1024² to 2048².
"""
import ctypes
import ctypes.util
from typing import Optional

__all__ = ["reuse_freed_cpu_memory"]

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (the one with ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def reuse_freed_cpu_memory(max_bytes: int = _INT_MAX) -> bool:
    """Make glibc's malloc serve every allocation up to ``max_bytes`` from its heap and keep freed
    heap memory for reuse instead of returning it to the kernel, so that a forward's large
    activations reuse the pages earlier ones freed.

    Process-wide and for the rest of the process, like jemalloc or tcmalloc preloaded (what Intel's
    PyTorch CPU guide recommends for the same reason): the process's resident memory stays at its
    peak. The project's speed tools call it unless told not to; call it once in a CPU inference
    process for the same effect (or set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
    in its environment).

    Args:
        max_bytes: the largest allocation served from the heap, at most 2**31 − 1.

    Returns:
        Whether it applied: False, with nothing changed, where the C library is not glibc.
    """
    if not 0 < max_bytes <= _INT_MAX:
        raise ValueError(f"max_bytes={max_bytes} must be in (0, {_INT_MAX}]")
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a fixed threshold also ends glibc's dynamic adjustment.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, max_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
