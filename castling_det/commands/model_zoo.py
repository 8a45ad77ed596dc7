"""Write the model-zoo table: every config's model, input size, GFLOPs, parameters and measured AP.

Every config shipped with castling_det (``Base-*.yaml`` excepted, LazyConfig recipes included) is
built on the CPU and counted as castling_det.analysis.zoo_table describes. AP figures come only from
``--ap-json``; a config it does not list is marked as not trained here. Both paths are relative to
the current folder; their defaults, ``docs/model_zoo_ap.json`` and ``docs/model_zoo.md``, are the
repository's files when run from a checkout's root.

Examples:
    python tools/model_zoo.py                                 # every config -> docs/model_zoo.md
    python tools/model_zoo.py --configs 'Shapes/*' --output /tmp/zoo.md
"""
import argparse
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from castling_det.analysis.machine import describe_machine
from castling_det.analysis.zoo_table import build_row, find_configs, format_row, format_table, load_ap_table

from .invocation import command_line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[], metavar="GLOB",
                        help="only the configs whose name (as castling_det.model_zoo names it, "
                             "e.g. 'Shapes/*') matches a glob")
    parser.add_argument("--ap-json", type=Path, default=Path("docs/model_zoo_ap.json"),
                        help="measured AP figures (default: docs/model_zoo_ap.json)")
    parser.add_argument("--output", type=Path, default=Path("docs/model_zoo.md"),
                        help="the Markdown file to write (default: docs/model_zoo.md)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    if not args.ap_json.is_file():
        parser.error(f"--ap-json {args.ap_json}: no such file")
    try:
        ap_table = load_ap_table(args.ap_json)
    except ValueError as error:
        parser.error(str(error))
    configs = find_configs(args.configs)
    if not configs:
        parser.error(f"no config matches {args.configs}")
    rows = []
    for config in tqdm(configs, desc="configs", unit="config"):
        rows.append(build_row(config, ap_table))
        tqdm.write(format_row(rows[-1], args.output.parent))
    machine = describe_machine(torch.device("cpu"))
    text = format_table(
        rows, ap_table,
        command=command_line() if argv is None else command_line(["castling-model-zoo", *argv]),
        minutes=(time.monotonic() - start) / 60,
        machine=f"{machine['device']}, {machine['cpu_count']} CPUs",
        ap_file=os.path.relpath(args.ap_json.resolve(), args.output.parent.resolve()),
        links_from=args.output.parent,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")


def run():
    """Console entry point (`castling-model-zoo`)."""
    main()


if __name__ == "__main__":
    run()
