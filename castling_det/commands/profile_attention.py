"""Where the time of one attention operator goes: PyTorch profiler table of its kernels.

Profiles ``attend`` (the operator alone, q, k, v in, per-head output out) of Castling-ViT's
linear-angular attention, eager or ``torch.compile``-fused, or softmax SDPA, next to the two bare
matmuls ``q(kᵀv)`` that bound it, at one token count, width and dtype. Each operator's header
gives its median latency and that latency divided by the two matmuls'.

Example:
    python tools/profile_attention.py --tokens 4096 --dim 768 --heads 12 --dtype fp32 --path eager
"""
import argparse

import torch

from castling_det.analysis.attention_operator import (
    OPERATOR_PATHS,
    attention_pair,
    operator_candidates,
    relative_latencies,
    token_side,
)
from castling_det.analysis.precision import DTYPES
from castling_det.analysis.profiling import kernel_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="a square number")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--path", choices=sorted(OPERATOR_PATHS), nargs="+", default=["eager", "fused", "compiled"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args(argv)
    try:
        args.side = token_side(args.tokens, "--tokens")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    castling, softmax = attention_pair(args.dim, args.heads, device)
    x = torch.randn(1, args.side, args.side, args.dim, device=device).to(DTYPES[args.dtype])
    candidates = operator_candidates(castling, softmax, x, args.path)
    with torch.inference_mode():
        for name, latency, ratio in relative_latencies(candidates, device, repeats=args.repeats):
            print(f"\n== {name}: {latency:.3f} ms median ({ratio:.2f}x the two matmuls), "
                  f"N={args.tokens}, dim={args.dim}, {args.dtype}, {device}")
            print(kernel_table(candidates[name], device, repeats=args.repeats, rows=args.rows))


def run():
    """Console entry point (`castling-profile-attention`)."""
    main()


if __name__ == "__main__":
    run()
