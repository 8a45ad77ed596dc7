"""reuse_freed_cpu_memory: large CPU tensors come from glibc's heap, not from fresh mmaps."""
import subprocess
import sys
import textwrap

import pytest

from castling_det import cpu_memory
from castling_det.cpu_memory import _glibc, reuse_freed_cpu_memory

# Run in a child process: the setting is process-wide and permanent. It prints the bytes glibc
# holds in mmapped blocks (mallinfo2's hblkhd) while a 64 MiB tensor is alive.
_PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, sys
    import torch

    # The module alone, not the package (whose import loads Detectron2 and takes seconds).
    spec = importlib.util.spec_from_file_location("cpu_memory", sys.argv[2])
    cpu_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_memory)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "reuse":
        assert cpu_memory.reuse_freed_cpu_memory()
    before = libc.mallinfo2().hblkhd
    tensor = torch.ones(16 * 2**20)  # 64 MiB, twice glibc's largest dynamic mmap threshold
    print(libc.mallinfo2().hblkhd - before)
    """
)


def _mmapped_bytes_while_allocated(mode: str) -> int:
    module = cpu_memory.__file__
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, module], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc 2.33 or newer")
def test_large_tensor_comes_from_the_heap_once_reuse_is_on():
    assert _mmapped_bytes_while_allocated("system") >= 64 * 2**20
    assert _mmapped_bytes_while_allocated("reuse") == 0


@pytest.mark.parametrize("max_bytes", [0, -1, 2**31])
def test_out_of_range_threshold_is_refused(max_bytes):
    with pytest.raises(ValueError, match="max_bytes"):
        reuse_freed_cpu_memory(max_bytes)
