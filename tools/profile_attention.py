#!/usr/bin/env python
"""Where the time of one attention operator goes: PyTorch profiler table of its kernels.

Profiles ``attend`` (the operator alone, q, k, v in, per-head output out) of Castling-ViT's
linear-angular attention, eager or ``torch.compile``-fused, or softmax SDPA, next to the two bare
matmuls ``q(kᵀv)`` that bound it, at one token count, width and dtype.

Example:
    python tools/profile_attention.py --tokens 4096 --dim 768 --heads 12 --dtype fp32 --path eager
"""
import argparse
import copy
import functools
import math

import torch
from torch.profiler import ProfilerActivity, profile

from castling_det.analysis.timing import median_latency_ms
from castling_det.modeling.attention import LinearAngularAttention, SoftmaxAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("eager", "compiled", "sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="a square number")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--path", choices=PATHS, nargs="+", default=["eager", "compiled"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args()

    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        raise SystemExit(f"--tokens={args.tokens} must be a square number")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    castling = LinearAngularAttention(dim=args.dim, num_heads=args.heads, softmax_branch=False)
    castling = castling.to(device, dtype).eval()
    x = torch.randn(1, side, side, args.dim, device=device, dtype=dtype)
    with torch.inference_mode():
        q, k, v = castling._project_qkv(x)
    softmax = SoftmaxAttention(dim=args.dim, num_heads=args.heads).to(device, dtype).eval()

    compiled = copy.deepcopy(castling)
    compiled.compile_tail = True
    modules = {"eager": castling, "compiled": compiled, "sdpa": softmax}
    candidates = {"two matmuls": lambda: torch.matmul(q, torch.matmul(k.transpose(-2, -1), v))}
    for path in args.path:
        candidates[path] = functools.partial(modules[path].attend, q, k, v, side, side)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.inference_mode():
        baseline = None
        for name, fn in candidates.items():
            latency = median_latency_ms(fn, device, warmup=3, repeats=args.repeats)
            baseline = baseline or latency
            print(f"\n== {name}: {latency:.3f} ms median ({latency / baseline:.2f}x the two matmuls), "
                  f"N={args.tokens}, dim={args.dim}, {args.dtype}, {device}")
            with profile(activities=activities) as prof:
                for _ in range(args.repeats):
                    fn()
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows))


if __name__ == "__main__":
    main()
