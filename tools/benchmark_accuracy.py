#!/usr/bin/env python
"""BCCD accuracy ablation: Castling-ViT-Ti Faster R-CNN arms trained and evaluated, resumably.

The code is castling_det/commands/benchmark_accuracy.py (its docstring has the usage); installed
with pip in a checkout, the same tool is the ``castling-benchmark-accuracy`` command.
"""
from castling_det.commands.benchmark_accuracy import run

if __name__ == "__main__":
    run()
