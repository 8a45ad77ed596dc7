"""The floating-point formats the measurement tools run in, by the names their options take."""
from contextlib import nullcontext

import torch

__all__ = ["DTYPES", "autocast"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype):
    """A context that runs ``device``'s operations under autocast to ``dtype`` (none for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
