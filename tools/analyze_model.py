#!/usr/bin/env python
"""Analyse a Castling-ViT detector like Detectron2's analyze_model.py: FLOPs (attention included),
parameters, activations and structure, with the softmax branch on or off.

The code is castling_det/commands/analyze_model.py (its docstring has the examples); installed
with pip, the same tool is the ``castling-analyze-model`` command.
"""
from castling_det.commands.analyze_model import run

if __name__ == "__main__":
    run()
