#!/usr/bin/env python
"""Speed, memory, FLOPs and numerics of Castling-ViT against its softmax and ViTDet-style twins.

The code is castling_det/commands/benchmark.py (its docstring has the examples) and the
measurements castling_det.analysis's; installed with pip, the same tool is the
``castling-benchmark`` command.
"""
from castling_det.commands.benchmark import run

if __name__ == "__main__":
    run()
