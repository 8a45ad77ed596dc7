"""How a command was run, as the tools record it next to what they write."""
import os
import shlex
import sys
from typing import Optional, Sequence

__all__ = ["command_line"]


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command line of this process (``argv``, by default ``sys.argv``), quoted for a shell:
    ``python tools/benchmark.py ...`` for a script, ``castling-benchmark ...`` (the name alone, not
    the environment's path to it) for an installed command."""
    argv = list(sys.argv if argv is None else argv)
    program = argv[0]
    if program.endswith(".py"):
        head = ["python", program]
    else:
        head = [os.path.basename(program)]
    return " ".join(head + [shlex.quote(arg) for arg in argv[1:]])
