"""Plot the training curves of one or more runs from their metrics.json: losses, AP (branch on
and off) and the softmax branch's schedule, L1 loss, kept mass and share, against the iteration,
one line per run, as losses.png, ap.png and branch.png (castling_det.analysis.curves draws them).

Example:
    python tools/plot_metrics.py output/run_a output/run_b --output /tmp/plots
"""
import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from castling_det.analysis.curves import plot_training_curves
from castling_det.analysis.metrics_log import read_metrics

logger = logging.getLogger("castling_det.plot_metrics")


def run_labels(paths):
    """A legend label per run: its folder's name, or the path as given where names repeat."""
    names = [os.path.basename(os.path.normpath(path)) for path in paths]
    return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="output folders holding metrics.json (or the files)")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the PNGs are written")
    args = parser.parse_args(argv)
    setup_logger(name="castling_det", abbrev_name="castling")
    try:
        runs = {label: read_metrics(path) for label, path in zip(run_labels(args.runs), args.runs)}
    except FileNotFoundError as err:
        sys.exit(f"{parser.prog}: error: {err}")
    for path in plot_training_curves(runs, args.output):
        logger.info("Wrote %s", path)


def run():
    """Console entry point (`castling-plot-metrics`)."""
    main()


if __name__ == "__main__":
    run()
