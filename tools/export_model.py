#!/usr/bin/env python
"""Export a trained Castling-ViT detector (softmax branch off) to TorchScript and/or ONNX.

The code is castling_det/commands/export_model.py (its docstring has the examples); installed with
pip, the same tool is the ``castling-export`` command.
"""
from castling_det.commands.export_model import run

if __name__ == "__main__":
    run()
