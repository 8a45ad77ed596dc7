#!/usr/bin/env python
"""Write the model-zoo table: every config's model, input size, GFLOPs, parameters and measured AP.

The code is castling_det/commands/model_zoo.py (its docstring has the examples) and the table's
castling_det.analysis.zoo_table; installed with pip, the same tool is the ``castling-model-zoo``
command.
"""
from castling_det.commands.model_zoo import run

if __name__ == "__main__":
    run()
