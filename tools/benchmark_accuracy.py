#!/usr/bin/env python
"""Accuracy benchmark: Castling-ViT-Ti Faster R-CNN against its softmax and window twins on BCCD.

Trains each variant with tools/train_net.py (same config, recipe and seed; only
MODEL.CASTLING.ATTN_KINDS differs), evaluates it on the val split (Castling with the softmax branch
on and off), and writes a Markdown table (AP, AP50, backbone GFLOPs at the test size, train+eval
wall time) and a plot of AP against backbone GFLOPs. GFLOPs are counted at the test size (from the
switch hook) and at the images' full 640x480 (on the same model, counted here).

Usage:
    python tools/benchmark_accuracy.py --data-root ../shared/datasets/bccd \\
        --work-dir output/benchmark_accuracy --output-dir docs/benchmarks/bccd
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from castling_det import add_castling_config, softmax_branch
from castling_det.analysis import count_gflops

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml"
CLASSES = "RBC,WBC,Platelets"
# Attention of the 12 blocks: ViTDet's layout keeps blocks 2, 5, 8 and 11 global.
VARIANTS = {
    "castling": '["castling"]',
    "softmax": '["softmax"]',
    "window": str(["softmax" if i in (2, 5, 8, 11) else "window" for i in range(12)]).replace("'", '"'),
}


def full_size_gflops(output_dir: Path) -> dict:
    """GFLOPs of a trained variant on one 640x480 image, branch on and off."""
    cfg = add_castling_config(get_cfg())
    cfg.merge_from_file(str(output_dir / "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    image = {"image": torch.zeros(3, 480, 640), "height": 480, "width": 640}
    gflops = {}
    for state in ("on", "off"):
        with softmax_branch(model, state == "on", scale=1.0):
            gflops[f"branch_{state}"] = count_gflops(model, [image], modules=("backbone.net",))
    return gflops


def train_variant(name: str, args) -> dict:
    """Train and evaluate one variant; return its last branch-switch record and wall time."""
    output_dir = Path(args.work_dir) / name
    cmd = [
        sys.executable, str(REPO / "tools/train_net.py"), "--config-file", str(CONFIG),
        "--register-voc", "bccd_train", args.data_root, "train", CLASSES,
        "--register-voc", "bccd_val", args.data_root, "val", CLASSES,
        "OUTPUT_DIR", str(output_dir), "MODEL.CASTLING.ATTN_KINDS", VARIANTS[name],
        *args.opts,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    record = json.loads((output_dir / "branch_switch.json").read_text())[-1]
    return {"record": record, "seconds": seconds, "gflops_640x480": full_size_gflops(output_dir)}


def table_rows(results: dict):
    """(label, AP, AP50, ViT GFLOPs at the test size, at 640x480, minutes) per evaluated model."""
    rows = []
    for name, result in results.items():
        for state, metrics in result["record"].items():
            if not state.startswith("branch_"):
                continue
            label = f"{name}, branch {state.split('_')[1]}" if name == "castling" else name
            full = result["gflops_640x480"][state]["backbone.net"]
            rows.append(
                (label, metrics["bbox"]["AP"], metrics["bbox"]["AP50"],
                 metrics["gflops"]["backbone.net"], full, result["seconds"] / 60)
            )
    return rows


def write_outputs(rows, output_dir: Path, machine: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Machine: {machine}.",
        "",
        "| model (ViT-Ti Faster R-CNN) | box AP | AP50 | ViT GFLOPs, test size | ViT GFLOPs, 640×480 "
        "| train + eval (min) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} |" for r in rows]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ap, _, _, gflops, _ in rows:
        ax.scatter(gflops, ap)
        ax.annotate(label, (gflops, ap), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ViT backbone GFLOPs (multiply-adds), 640×480")
    ax.set_ylabel("BCCD val box AP")
    ax.set_title("AP against backbone GFLOPs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "ap_vs_gflops.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared/datasets/bccd"))
    parser.add_argument("--work-dir", default="output/benchmark_accuracy")
    parser.add_argument("--output-dir", default="output/benchmark_accuracy")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--machine", default="2-core x86_64 CPU, fp32")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every variant")
    args = parser.parse_args()
    if not (Path(args.data_root) / "ImageSets/Main/train.txt").is_file():
        sys.exit(f"BCCD not found under {args.data_root} (expected ImageSets/Main/train.txt)")
    results = {name: train_variant(name, args) for name in args.variants}
    (Path(args.work_dir) / "summary.json").write_text(json.dumps(results, indent=1))
    write_outputs(table_rows(results), Path(args.output_dir), args.machine)


if __name__ == "__main__":
    main()
