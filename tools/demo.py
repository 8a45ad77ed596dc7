#!/usr/bin/env python
"""Draw a trained Castling-ViT detector's predictions on images, folders of images or a video.

The code is castling_det/commands/demo.py (its docstring has the examples); installed with
pip, the same tool is the ``castling-demo`` command.
"""
from castling_det.commands.demo import run

if __name__ == "__main__":
    run()
