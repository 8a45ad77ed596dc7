"""Speed, memory, FLOPs and numerics of Castling-ViT against its softmax and ViTDet-style twins.

All variants come from configs (by default the three ViT-B Mask R-CNN configs shipped with
castling_det, which differ only in MODEL.CASTLING.ATTN_KINDS), built the same way, measured in one
run on one machine:

- ``backbone``: the ViT alone at each of ``--sizes`` (square images), every ``--dtypes``:
  median latency, peak memory, fvcore GMACs with attention counted, and the floor its linear
  layers set.
- ``detector``: the whole detector at each of ``--detector-sizes`` (score threshold 0, so every
  variant runs its heads on the same 100 detections).
- ``operator``: one attention layer at ``--operator-tokens`` tokens of width ``--operator-dim``:
  the operator against its two bare matmuls q(kᵀv), eager and ``torch.compile``-fused; peak
  memory of the layer; the branch's training peak, chunked against naive.
- ``accuracy``: bf16 and fp16 against float64 on the normalised output, and fp16 at
  ``--large-tokens`` tokens.

Writes ``backbone.csv``, ``detector.csv``, ``operator.csv``, ``accuracy.csv``, ``targets.csv``,
``benchmark.png`` (latency and memory against pixels, log-log) and ``summary.md`` (the command,
the machine, every table in Markdown) under ``--output-dir`` (a path relative to the current
folder, ``output/benchmark`` by default), and prints the targets. bf16 and fp16 run under
autocast. On a GPU nothing changes but ``--device``. The measurements are
castling_det.analysis's (model_speed, attention_operator, targets, benchmark_report).

Example (the README lists the commands behind its figures):
    python tools/benchmark.py --output-dir output/benchmark --sizes 512 1024 2048 --dtypes fp32 bf16
"""
import argparse
from pathlib import Path
from typing import Dict, List

import torch

from castling_det.analysis.attention_operator import bench_accuracy, bench_operator, token_side
from castling_det.analysis.benchmark_report import (
    format_targets,
    plot_backbones,
    write_csv,
    write_summary,
)
from castling_det.analysis.machine import add_cpu_malloc_argument, apply_cpu_malloc, describe_machine
from castling_det.analysis.model_speed import bench_backbones, bench_detectors, build_deployed_variant
from castling_det.analysis.precision import DTYPES
from castling_det.analysis.targets import benchmark_targets
from castling_det.model_zoo import get_config_file

from .invocation import command_line

TASKS = ("backbone", "detector", "operator", "accuracy")
DEFAULT_VARIANTS = [
    f"{name}=COCO-InstanceSegmentation/mask_rcnn_{name}_vit_b_fpn_3x.yaml" for name in ("castling", "window", "softmax")
]


# --SUFFIX-variants NAME adds NAME-SUFFIX, the variant with this override: the compiled tail,
# the eager reference operator in place of the fused default, or the ViT as CUDA graphs.
EXTRA_VARIANTS = {
    "compiled": ("MODEL.CASTLING.COMPILE_TAIL", "True"),
    "eager": ("MODEL.CASTLING.FUSED_DEPLOYED", "False"),
    "graphs": ("MODEL.CASTLING.CUDA_GRAPHS", "True"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/benchmark", help="default: output/benchmark")
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME=CONFIG",
        help="config files, or configs shipped with castling_det named as castling_det.model_zoo "
             "names them (default: the three ViT-B Mask R-CNN twins)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--detector-sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument(
        "--max-size", nargs="+", default=[], metavar="NAME=SIZE",
        help="skip a variant's backbone above this size (e.g. softmax=1024 where 2048 takes minutes)",
    )
    for suffix, (key, value) in EXTRA_VARIANTS.items():
        parser.add_argument(
            f"--{suffix}-variants", nargs="+", default=[], metavar="NAME",
            help=f"also run these variants with {key} {value}, as NAME-{suffix}",
        )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--operator-tokens", type=int, default=4096, help="a square number")
    parser.add_argument("--operator-dim", type=int, default=768)
    parser.add_argument("--operator-heads", type=int, default=12)
    parser.add_argument("--large-tokens", type=int, default=65536, help="a square number")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    add_cpu_malloc_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every variant")
    args = parser.parse_args(argv)
    try:
        args.variants = {name: _config_path(path) for name, path in _pairs(parser, args.variants, "--variants").items()}
        token_side(args.operator_tokens, "--operator-tokens")
        token_side(args.large_tokens, "--large-tokens")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    args.max_size = {name: int(size) for name, size in _pairs(parser, args.max_size, "--max-size").items()}
    for suffix in EXTRA_VARIANTS:
        unknown = [name for name in getattr(args, f"{suffix}_variants") if name not in args.variants]
        if unknown:
            parser.error(f"--{suffix}-variants: {unknown} not among the variants {sorted(args.variants)}")
    return args


def _pairs(parser, pairs: List[str], option: str) -> Dict[str, str]:
    """``NAME=VALUE`` strings as a dict."""
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            parser.error(f"{option}: expected NAME=VALUE, got {pair!r}")
        parsed[name] = value
    return parsed


def _config_path(config: str) -> str:
    """A config file as given, or else the shipped config of that name."""
    if Path(config).is_file():
        return config
    try:
        return get_config_file(config)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--variants: {config!r} is neither a file nor a config shipped with castling_det "
            "(castling_det.model_zoo.list_configs() lists those)"
        ) from None


def build_models(args) -> Dict[str, torch.nn.Module]:
    """Every variant's deployed detector, and NAME-SUFFIX for each NAME of ``--SUFFIX-variants``
    (SUFFIX a key of :data:`EXTRA_VARIANTS`)."""
    models = {name: build_deployed_variant(path, args.opts, args.device) for name, path in args.variants.items()}
    for suffix, override in EXTRA_VARIANTS.items():
        for name in getattr(args, f"{suffix}_variants"):
            opts = args.opts + list(override)
            models[f"{name}-{suffix}"] = build_deployed_variant(args.variants[name], opts, args.device)
    return models


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine(device)
    if device.type == "cpu":
        machine["cpu_malloc"] = apply_cpu_malloc(args.cpu_malloc)
    print("machine", machine)
    torch.manual_seed(0)
    timing = {"warmup": args.warmup, "repeats": args.repeats}
    command = command_line() if argv is None else command_line(["castling-benchmark", *argv])

    # The quick tasks first; every CSV (and the targets) is written as soon as its task ends, so
    # an interrupted run keeps what it measured.
    results: Dict[str, List[dict]] = {}

    def save(task: str, rows: List[dict]) -> None:
        results[task] = rows
        write_csv(output_dir / f"{task}.csv", rows)
        results["targets"] = benchmark_targets(results, device.type)
        write_csv(output_dir / "targets.csv", results["targets"])
        write_summary(output_dir / "summary.md", results, machine, command)

    operator = (args.operator_tokens, args.operator_dim, args.operator_heads)
    if "operator" in args.tasks:
        save("operator", bench_operator(*operator, args.dtypes, device, compiled=not args.no_compile, **timing))
        print("\n".join(f"operator {row}" for row in results["operator"]))
    if "accuracy" in args.tasks:
        save("accuracy", bench_accuracy(*operator, args.large_tokens, device, compiled=not args.no_compile))
        print("\n".join(f"accuracy {row}" for row in results["accuracy"]))
    if {"backbone", "detector"} & set(args.tasks):
        models = build_models(args)
        if "backbone" in args.tasks:
            save("backbone", bench_backbones(models, args.sizes, args.dtypes, device, max_sizes=args.max_size, **timing))
            plot_backbones(results["backbone"], output_dir / "benchmark.png", f"ViT backbones on {machine['device']}")
        if "detector" in args.tasks:
            save("detector", bench_detectors(models, args.detector_sizes, args.dtypes, device, **timing))
    results.setdefault("targets", benchmark_targets(results, device.type))
    print("\n" + format_targets(results["targets"]))
    print(f"wrote {output_dir}")


def run():
    """Console entry point (`castling-benchmark`)."""
    main()


if __name__ == "__main__":
    run()
