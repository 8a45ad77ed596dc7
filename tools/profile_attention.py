#!/usr/bin/env python
"""Where the time of one attention operator goes: PyTorch profiler table of its kernels.

The code is castling_det/commands/profile_attention.py (its docstring has the examples);
installed with pip, the same tool is the ``castling-profile-attention`` command.
"""
from castling_det.commands.profile_attention import run

if __name__ == "__main__":
    run()
