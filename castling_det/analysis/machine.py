"""The machine a measurement ran on, as the measurement tools record it next to their figures."""
import os
import platform
from pathlib import Path

import torch

__all__ = ["describe_machine"]


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
