"""The machine a measurement ran on, as the measurement tools record it next to their figures."""
import argparse
import os
import platform
from pathlib import Path

import torch

from castling_det.cpu_memory import reuse_freed_cpu_memory

__all__ = ["add_cpu_malloc_argument", "apply_cpu_malloc", "describe_machine"]

CPU_MALLOC_MODES = ("reuse", "system")


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict:
    """``device``'s name (the GPU's, or the CPU's model), PyTorch's version and thread count, the
    number of CPUs and Python's version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def add_cpu_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """The speed tools' ``--cpu-malloc`` option (see :func:`apply_cpu_malloc`)."""
    parser.add_argument(
        "--cpu-malloc", choices=CPU_MALLOC_MODES, default="reuse",
        help="reuse: large tensors from glibc's heap (castling_det.cpu_memory.reuse_freed_cpu_memory); "
             "system: the C library's defaults (default: reuse)",
    )


def apply_cpu_malloc(mode: str) -> str:
    """Set the process's CPU allocation policy by ``--cpu-malloc`` mode; returns what is in effect,
    as the tools record it beside their figures."""
    if mode == "reuse" and reuse_freed_cpu_memory():
        return "glibc heap reuse"
    return "C library defaults"
