#!/usr/bin/env python
"""Plot the training curves of one or more runs from their metrics.json (losses, AP, the softmax
branch's statistics) as PNGs.

The code is castling_det/commands/plot_metrics.py (its docstring has the examples); installed
with pip, the same tool is the ``castling-plot-metrics`` command.
"""
from castling_det.commands.plot_metrics import run

if __name__ == "__main__":
    run()
