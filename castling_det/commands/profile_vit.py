"""How the ViT's time on the CPU grows with the input: profiler self time per operator at two sizes.

Builds a config's model (branch off, as deployed), runs its ViT once per size under the profiler
(after one warm-up call) and prints, per ATen operator, the self time at each size and their
ratio, largest first. A ratio above (size2 / size1)² is an operator that scales worse than linear
in the number of tokens.

Example:
    python tools/profile_vit.py --sizes 1024 2048 --dtype bf16 \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_castling_vit_b_fpn_3x.yaml
"""
import argparse
import math

import torch
from detectron2.modeling import build_model

from castling_det import load_castling_config, set_softmax_branch
from castling_det.analysis.machine import add_cpu_malloc_argument, apply_cpu_malloc
from castling_det.analysis.precision import DTYPES
from castling_det.analysis.profiling import operator_self_times_ms, self_time_growth


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--sizes", nargs=2, type=int, default=[1024, 2048])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=14)
    add_cpu_malloc_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    malloc = apply_cpu_malloc(args.cpu_malloc)

    cfg = load_castling_config(args.config_file, args.opts, device="cpu")
    model = build_model(cfg).eval()
    set_softmax_branch(model, False)
    cpu, dtype = torch.device("cpu"), DTYPES[args.dtype]
    small, large = args.sizes
    times = {size: operator_self_times_ms(model.backbone.net, size, cpu, dtype) for size in (small, large)}
    totals = {size: sum(times[size].values()) for size in (small, large)}
    print(f"ViT of {args.config_file}, {args.dtype}, CPU ({malloc}): total self time {totals[small]:.0f} ms "
          f"at {small}², {totals[large]:.0f} ms at {large}² "
          f"(linear in tokens would be x{(large / small) ** 2:.1f})")
    print(f"{'operator':<32} {f'{small}² ms':>10} {f'{large}² ms':>10} {'ratio':>7}")
    for name, before, after, ratio in self_time_growth(times[small], times[large])[: args.rows]:
        shown = "      -" if math.isnan(ratio) else f"{ratio:7.2f}"
        print(f"{name:<32} {before:10.1f} {after:10.1f} {shown}")


def run():
    """Console entry point (`castling-profile-vit`)."""
    main()


if __name__ == "__main__":
    run()
