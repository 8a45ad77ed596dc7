#!/usr/bin/env python
"""Generate the synthetic shapes data set (COCO format, with masks) that `make run` trains on.

The code is castling_det/commands/make_shapes_dataset.py; installed with pip, the same tool is the
``castling-make-shapes-dataset`` command.

Usage: python tools/make_shapes_dataset.py --output datasets/shapes [--num-train 300 --num-val 60]
"""
from castling_det.commands.make_shapes_dataset import run

if __name__ == "__main__":
    run()
