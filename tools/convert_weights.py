#!/usr/bin/env python
"""Convert a softmax-ViT checkpoint (timm, DeiT, MAE, Detectron2/ViTDet) into Castling-ViT weights.

The code is castling_det/commands/convert_weights.py (its docstring has the examples); installed
with pip, the same tool is the ``castling-convert-weights`` command.
"""
from castling_det.commands.convert_weights import run

if __name__ == "__main__":
    run()
