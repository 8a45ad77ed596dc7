#!/usr/bin/env python
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
from contextlib import nullcontext

import torch
from detectron2.modeling import build_model
from torch.profiler import profile

from castling_det import load_castling_config, set_softmax_branch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def self_times_ms(vit, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Self time in ms of each operator over one forward pass of a ``size``² image."""
    image = torch.randn(1, 3, size, size, device=device)
    cast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    with torch.inference_mode(), cast:
        vit(image)  # warm-up
        with profile() as prof:
            vit(image)
    return {event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--sizes", nargs=2, type=int, default=[1024, 2048])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args()

    cfg = load_castling_config(args.config_file, args.opts, device="cpu")
    model = build_model(cfg).eval()
    set_softmax_branch(model, False)
    small, large = args.sizes
    times = {size: self_times_ms(model.backbone.net, size, torch.device("cpu"), DTYPES[args.dtype])
             for size in (small, large)}
    totals = {size: sum(times[size].values()) for size in (small, large)}
    print(f"ViT of {args.config_file}, {args.dtype}, CPU: total self time {totals[small]:.0f} ms "
          f"at {small}², {totals[large]:.0f} ms at {large}² "
          f"(linear in tokens would be x{(large / small) ** 2:.1f})")
    print(f"{'operator':<32} {f'{small}² ms':>10} {f'{large}² ms':>10} {'ratio':>7}")
    for name, value in sorted(times[large].items(), key=lambda kv: -kv[1])[: args.rows]:
        before = times[small].get(name, 0.0)
        ratio = f"{value / before:7.2f}" if before > 0 else "      -"
        print(f"{name:<32} {before:10.1f} {value:10.1f} {ratio}")


if __name__ == "__main__":
    main()
