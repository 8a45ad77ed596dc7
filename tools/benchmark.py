#!/usr/bin/env python
"""Speed, memory, FLOPs and numerics of Castling-ViT against its softmax and ViTDet-style twins.

All variants come from configs (by default the three ViT-B Mask R-CNN configs, which differ only in
MODEL.CASTLING.ATTN_KINDS), built the same way, measured in one run on one machine:

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
the machine, every table in Markdown) under ``--output-dir``, and prints the targets. bf16 and
fp16 run under autocast. On a GPU nothing changes but ``--device``.

Example (the README lists the commands behind its figures):
    python tools/benchmark.py --output-dir output/benchmark --sizes 512 1024 2048 --dtypes fp32 bf16
"""
import argparse
import copy
import csv
import math
import os
import platform
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from castling_det import load_castling_config, set_softmax_branch  # noqa: E402
from castling_det.analysis import ATTENTION_FLOP_HANDLES, count_gflops  # noqa: E402
from castling_det.analysis.timing import median_latency_ms, peak_memory_mib  # noqa: E402
from castling_det.modeling.attention import (  # noqa: E402
    LinearAngularAttention,
    SoftmaxAttention,
    masked_softmax_attention,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = ("backbone", "detector", "operator", "accuracy")
DEFAULT_VARIANTS = [
    f"{name}=configs/COCO-InstanceSegmentation/mask_rcnn_{name}_vit_b_fpn_3x.yaml"
    for name in ("castling", "window", "softmax")
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/benchmark")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME=CONFIG")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--detector-sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument(
        "--max-size", nargs="+", default=[], metavar="NAME=SIZE",
        help="skip a variant's backbone above this size (e.g. softmax=1024 where 2048 takes minutes)",
    )
    parser.add_argument(
        "--compiled-variants", nargs="+", default=[], metavar="NAME",
        help="also run these variants with MODEL.CASTLING.COMPILE_TAIL True, as NAME-compiled",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--operator-tokens", type=int, default=4096, help="a square number")
    parser.add_argument("--operator-dim", type=int, default=768)
    parser.add_argument("--operator-heads", type=int, default=12)
    parser.add_argument("--large-tokens", type=int, default=65536, help="a square number")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every variant")
    return parser.parse_args()


def parse_pairs(pairs: List[str], what: str) -> Dict[str, str]:
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {pair!r}")
        parsed[name] = value
    return parsed


def build_variant(config_file: str, opts: List[str], device: str) -> nn.Module:
    """The deployed detector of a config: eval mode, softmax branch off, random weights."""
    if not Path(config_file).is_file():
        raise SystemExit(f"config file not found: {config_file}")
    cfg = load_castling_config(config_file, opts, device=device)
    # Every variant keeps its 100 top detections, so the heads do the same work in all of them.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    set_softmax_branch(model, False)
    return model


@contextmanager
def eager_attention(model: nn.Module):
    """fvcore counts through torch.jit.trace, which cannot enter torch.compile: count a compiled
    model as its eager twin (the same operations)."""
    compiled = [m for m in model.modules() if getattr(m, "compile_tail", False)]
    for module in compiled:
        module.compile_tail = False
    try:
        yield
    finally:
        for module in compiled:
            module.compile_tail = True


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def timed(fn, device, args) -> Dict[str, float]:
    return {
        "latency_ms": median_latency_ms(fn, device, warmup=args.warmup, repeats=args.repeats),
        "peak_mem_mib": peak_memory_mib(fn, device),
    }


def vit_gmacs(vit: nn.Module, image: torch.Tensor) -> Dict[str, float]:
    """fvcore GMACs of the ViT (attention included) and the floor of its linear layers alone."""
    counter = FlopCountAnalysis(vit, (image,)).set_op_handle(**ATTENTION_FLOP_HANDLES)
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with eager_attention(vit):
        by_module = counter.by_module()
    linear = [name for name, m in vit.named_modules() if isinstance(m, nn.Linear)]
    floor = sum(by_module[name] for name in linear) + by_module["patch_embed"]
    return {"gmacs": counter.total() / 1e9, "floor_gmacs": floor / 1e9}


def bench_backbones(models, args, device, max_sizes) -> List[dict]:
    rows = []
    # A progress bar over (variant, size); tqdm.write prints the rows above it.
    progress = tqdm(total=len(models) * len(args.sizes), desc="backbone", unit="size")
    for name, model in models.items():
        vit = model.backbone.net
        for size in args.sizes:
            if size > int(max_sizes.get(name, size)):
                tqdm.write(f"backbone {name} {size}: skipped (--max-size)")
                progress.update()
                continue
            image = torch.randn(1, 3, size, size, device=device)
            with torch.inference_mode():
                flops = vit_gmacs(vit, image)
            for dtype_name in args.dtypes:
                def run():
                    with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                        vit(image)
                row = {"variant": name, "dtype": dtype_name, "size": size,
                       "tokens": (size // vit.patch_size) ** 2, **timed(run, device, args), **flops}
                tqdm.write(f"backbone {row}")
                rows.append(row)
            progress.update()
    progress.close()
    return rows


def bench_detectors(models, args, device) -> List[dict]:
    """The whole detector, and where its time goes: the ViT, the ViT with its feature pyramid,
    and (the rest) the RPN, ROI heads and post-processing."""
    rows = []
    progress = tqdm(total=len(models) * len(args.detector_sizes), desc="detector", unit="size")
    for name, model in models.items():
        for size in args.detector_sizes:
            image = torch.randint(0, 256, (3, size, size), device=device).float()
            inputs = [{"image": image, "height": size, "width": size}]
            normalized = ((image - model.pixel_mean) / model.pixel_std)[None]
            with eager_attention(model):
                gmacs = count_gflops(model, inputs, modules=())["model"]
            for dtype_name in args.dtypes:
                def run(fn, *fn_args):
                    def call():
                        with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                            fn(*fn_args)
                    return call
                row = {"variant": name, "dtype": dtype_name, "size": size,
                       **timed(run(model, inputs), device, args), "gmacs": gmacs}
                for stage, module in (("vit_ms", model.backbone.net), ("vit_pyramid_ms", model.backbone)):
                    row[stage] = median_latency_ms(
                        run(module, normalized), device, warmup=args.warmup, repeats=args.repeats
                    )
                tqdm.write(f"detector {row}")
                rows.append(row)
            progress.update()
    progress.close()
    return rows


def _attention_pair(args, device):
    side = math.isqrt(args.operator_tokens)
    if side * side != args.operator_tokens:
        raise SystemExit(f"--operator-tokens={args.operator_tokens} must be a square number")
    kw = dict(dim=args.operator_dim, num_heads=args.operator_heads)
    castling = LinearAngularAttention(**kw, softmax_branch=False).to(device).eval()
    softmax = SoftmaxAttention(**kw).to(device).eval()
    return side, castling, softmax


def bench_operator(args, device) -> List[dict]:
    """The attention operator alone on (B, heads, N, d) q, k, v laid out as the projection
    leaves them, against its two bare matmuls; the layer's and the branch's peak memory."""
    side, castling, softmax = _attention_pair(args, device)
    common = {"tokens": side * side, "dim": args.operator_dim}
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.randn(1, side, side, args.operator_dim, device=device)
        castling_d, softmax_d = copy.deepcopy(castling).to(dtype), copy.deepcopy(softmax).to(dtype)
        with torch.inference_mode():
            q, k, v = castling_d._project_qkv(x.to(dtype))
        candidates = {
            "two matmuls q(k^T v)": lambda: torch.matmul(q, torch.matmul(k.transpose(-2, -1), v)),
            "castling eager": lambda: castling_d.attend(q, k, v, side, side),
            "softmax SDPA": lambda: softmax_d.attend(q, k, v, side, side),
        }
        if not args.no_compile:
            compiled = copy.deepcopy(castling_d)
            compiled.compile_tail = True
            candidates["castling compiled"] = lambda: compiled.attend(q, k, v, side, side)
        for op_name, fn in candidates.items():
            with torch.inference_mode():
                row = {"operator": op_name, "dtype": dtype_name, **common, **timed(fn, device, args)}
            print("operator", row)
            rows.append(row)
        for op_name, layer in (("castling layer", castling), ("softmax layer", softmax)):
            with torch.inference_mode(), autocast(device, dtype):
                mem = peak_memory_mib(lambda: layer(x), device)
            rows.append({"operator": op_name, "dtype": dtype_name, **common, "peak_mem_mib": mem})
            print("operator", rows[-1])

    # The training-time branch (forward and backward), chunked as configured against naive.
    head_dim = args.operator_dim // args.operator_heads
    q, k, v = (torch.randn(1, args.operator_heads, side * side, head_dim, device=device,
                           requires_grad=True) for _ in range(3))
    for op_name, chunk in (("branch train naive", None),
                           ("branch train chunked", castling.branch_chunk_size)):
        def step():
            out, mass = masked_softmax_attention(q, k, v, threshold=0.02, chunk_size=chunk)
            (out.sum() + mass).backward()
        mem = peak_memory_mib(step, device)
        rows.append({"operator": op_name, "dtype": "fp32", **common, "peak_mem_mib": mem})
        print("operator", rows[-1])
    return rows


def normalised_error(module: LinearAngularAttention, x: torch.Tensor, dtype: torch.dtype, side: int):
    """Relative Frobenius error of the operator at ``dtype`` against float64 on the same inputs:
    q, k, v rounded to ``dtype`` feed both, so the error is the operator's own."""
    reference_module = copy.deepcopy(module).double()
    reference_module.compile_tail = False
    low = copy.deepcopy(module).to(dtype)
    with torch.inference_mode():
        q, k, v = (t.to(dtype) for t in low._project_qkv(x.to(dtype)))
        reference = reference_module.attend(q.double(), k.double(), v.double(), side, side)
        out = low.attend(q, k, v, side, side).double()
    return ((out - reference).norm() / reference.norm()).item(), bool(torch.isfinite(out).all())


def bench_accuracy(args, device) -> List[dict]:
    side, castling, _ = _attention_pair(args, device)
    with torch.no_grad():
        castling.dwconv.weight.zero_()  # the output is then the normalised sum alone
    rows = []
    x = torch.randn(1, side, side, args.operator_dim, device=device)
    paths = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for path, compile_tail in paths:
        castling.compile_tail = compile_tail
        for dtype_name in ("bf16", "fp16"):
            error, finite = normalised_error(castling, x, DTYPES[dtype_name], side)
            rows.append({"path": path, "dtype": dtype_name, "tokens": side * side,
                         "rel_error": error, "finite": finite})
            print("accuracy", rows[-1])
    castling.compile_tail = False
    large_side = math.isqrt(args.large_tokens)
    x = torch.randn(1, large_side, large_side, args.operator_dim, device=device)
    error, finite = normalised_error(castling, x, torch.float16, large_side)
    rows.append({"path": "eager", "dtype": "fp16", "tokens": large_side**2, "rel_error": error,
                 "finite": finite})
    print("accuracy", rows[-1])
    return rows


def _value(rows: List[dict], key: str, **match):
    """``key`` of the first row matching ``match``, or None where there is none."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0].get(key) if found else None


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def targets(results: Dict[str, List[dict]], device: torch.device) -> List[dict]:
    """The targets of issue #5, each with its measured value (None where not measured)."""
    bb, det = results.get("backbone", []), results.get("detector", [])
    op, acc = results.get("operator", []), results.get("accuracy", [])
    out = []

    def add(name, value, limit, at_least=False):
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": name, "measured": value, "limit": limit, "met": met})

    def gmacs(variant, key="gmacs"):
        return _value(bb, key, variant=variant, size=1024, dtype="fp32")

    add("backbone GMACs castling/window @1024", _ratio(gmacs("castling"), gmacs("window")), 0.74)
    add("backbone GMACs castling/softmax @1024", _ratio(gmacs("castling"), gmacs("softmax")), 0.55)
    add("backbone GMACs castling/floor @1024",
        _ratio(gmacs("castling"), gmacs("castling", "floor_gmacs")), 1.02)
    for dtype_name, limit in (("fp32", 0.75), ("bf16", 0.6)):
        latency = {v: _value(det, "latency_ms", variant=v, size=1024, dtype=dtype_name)
                   for v in ("castling", "window")}
        add(f"{device.type} detector latency castling/window @1024 {dtype_name}",
            _ratio(latency["castling"], latency["window"]), limit)
    for dtype_name in ("fp32", "bf16"):
        latency = {s: _value(bb, "latency_ms", variant="castling", size=s, dtype=dtype_name)
                   for s in (1024, 2048)}
        add(f"castling backbone latency 2048/1024 {dtype_name}",
            _ratio(latency[2048], latency[1024]), 4.6)
    for dtype_name in dict.fromkeys(r["dtype"] for r in op):
        matmuls = _value(op, "latency_ms", operator="two matmuls q(k^T v)", dtype=dtype_name)
        for path in ("eager", "compiled"):
            latency = _value(op, "latency_ms", operator=f"castling {path}", dtype=dtype_name)
            add(f"operator/matmuls {path} {dtype_name}", _ratio(latency, matmuls), 1.5)
        add(f"castling layer peak MiB {dtype_name}",
            _value(op, "peak_mem_mib", operator="castling layer", dtype=dtype_name), 100)
    add("branch chunked/naive peak memory",
        _ratio(_value(op, "peak_mem_mib", operator="branch train chunked"),
               _value(op, "peak_mem_mib", operator="branch train naive")), 0.25)
    largest = max((r["tokens"] for r in acc), default=None)
    for row in acc:
        if row["tokens"] == largest:
            add(f"fp16 finite at N={largest}", float(row["finite"]), 1.0, at_least=True)
        else:
            add(f"{row['dtype']} {row['path']} rel. error vs fp64", row["rel_error"], 2e-3)
    return out


def write_csv(path: Path, rows: List[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Backbone latency and peak memory against pixels, log-log, one line per variant and dtype."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # One colour per variant, one line style per dtype.
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows))}
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    for (variant, dtype_name) in dict.fromkeys((r["variant"], r["dtype"]) for r in rows):
        line = sorted((r for r in rows if r["variant"] == variant and r["dtype"] == dtype_name),
                      key=lambda r: r["size"])
        pixels = [r["size"] ** 2 for r in line]
        for ax, key in zip(axes, ("latency_ms", "peak_mem_mib")):
            ax.plot(pixels, [r[key] for r in line], styles[dtype_name], color=colors[variant],
                    marker="o", label=f"{variant} {dtype_name}")
    for ax, label in zip(axes, ("latency (ms, median)", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("pixels (square input)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def write_summary(path: Path, results: Dict[str, List[dict]], env: dict) -> None:
    """Every table of the run in Markdown, under the command and the machine that produced it."""
    lines = ["# tools/benchmark.py", "", "```", "python " + " ".join(sys.argv), "```", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for name in ("targets", *TASKS):
        rows = results.get(name)
        if not rows:
            continue
        fields = list(dict.fromkeys(key for row in rows for key in row))
        lines += [f"## {name}", "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        lines += ["| " + " | ".join(_cell(row.get(f)) for f in fields) + " |" for row in rows]
        lines.append("")
    path.write_text("\n".join(lines))


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")]
            name = models[0] if models else name
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    variants = parse_pairs(args.variants, "--variants")
    max_sizes = parse_pairs(args.max_size, "--max-size")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print("environment", env)
    torch.manual_seed(0)

    # The quick tasks first; every CSV (and the targets) is written as soon as its task ends, so
    # an interrupted run keeps what it measured.
    results: Dict[str, List[dict]] = {}

    def save(task: str, rows: List[dict]) -> None:
        results[task] = rows
        write_csv(output_dir / f"{task}.csv", rows)
        results["targets"] = targets(results, device)
        write_csv(output_dir / "targets.csv", results["targets"])
        write_summary(output_dir / "summary.md", results, env)

    if "operator" in args.tasks:
        save("operator", bench_operator(args, device))
    if "accuracy" in args.tasks:
        save("accuracy", bench_accuracy(args, device))
    if {"backbone", "detector"} & set(args.tasks):
        models = {name: build_variant(cfg, args.opts, args.device) for name, cfg in variants.items()}
        for name in args.compiled_variants:
            if name not in variants:
                raise SystemExit(f"--compiled-variants: {name!r} is not among {sorted(variants)}")
            compile_opts = args.opts + ["MODEL.CASTLING.COMPILE_TAIL", "True"]
            models[f"{name}-compiled"] = build_variant(variants[name], compile_opts, args.device)
        if "backbone" in args.tasks:
            save("backbone", bench_backbones(models, args, device, max_sizes))
            plot(results["backbone"], output_dir / "benchmark.png", f"ViT backbones on {env['device']}")
        if "detector" in args.tasks:
            save("detector", bench_detectors(models, args, device))
    results.setdefault("targets", targets(results, device))
    print(f"\n{'target':<48} {'measured':>12} {'limit':>8}  met")
    for row in results["targets"]:
        value = "-" if row["measured"] is None else f"{row['measured']:.4g}"
        print(f"{row['target']:<48} {value:>12} {row['limit']:>8}  {row['met']}")
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    main()
