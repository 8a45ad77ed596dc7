#!/usr/bin/env python
"""Train or evaluate a Castling-ViT detector from a yacs config, like Detectron2's train_net.py.

The code is castling_det/commands/train_net.py (its docstring has the examples); installed with
pip, the same tool is the ``castling-train`` command.
"""
from castling_det.commands.train_net import run

if __name__ == "__main__":
    run()
