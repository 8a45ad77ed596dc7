#!/usr/bin/env python
"""How the ViT's time on the CPU grows with the input: profiler self time per operator at two sizes.

The code is castling_det/commands/profile_vit.py (its docstring has the examples); installed with
pip, the same tool is the ``castling-profile-vit`` command.
"""
from castling_det.commands.profile_vit import run

if __name__ == "__main__":
    run()
