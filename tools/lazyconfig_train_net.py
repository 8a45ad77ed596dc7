#!/usr/bin/env python
"""Train or evaluate a Castling-ViT detector from a LazyConfig, like Detectron2's own tool.

The code is castling_det/commands/lazyconfig_train_net.py (its docstring has the examples);
installed with pip, the same tool is the ``castling-lazyconfig-train`` command.
"""
from castling_det.commands.lazyconfig_train_net import run

if __name__ == "__main__":
    run()
