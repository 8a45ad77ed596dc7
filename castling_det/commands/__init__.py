"""castling_det's command-line tools, installed as console commands (``castling-train``, ...) and
run from a checkout as ``python tools/<name>.py``."""
