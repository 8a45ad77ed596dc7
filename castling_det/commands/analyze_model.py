"""Analyse a Castling-ViT detector like Detectron2's analyze_model.py: FLOPs (attention included),
parameters, activations and structure, with the softmax branch on or off.

FLOPs are fvcore's multiply-adds plus the handles of castling_det.analysis (scaled_dot_product_attention,
L2 norms, GELU), shown per module (castling_det.analysis.flop_table). Inputs are synthetic images of
``--input-size`` (no data set needed), or the first ``--num-inputs`` images of the config's first
test set.

Examples:
    python tools/analyze_model.py --tasks flop --input-size 1024 1024 --softmax-branch off \\
        --config-file configs/COCO-Detection/faster_rcnn_castling_vit_b_fpn_3x.yaml
    python tools/analyze_model.py --config-file CONFIG --tasks parameter structure
"""
import argparse
import itertools

import torch
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.analysis import activation_count_operators
from fvcore.nn import parameter_count_table

from castling_det import load_castling_config, set_softmax_branch
from castling_det.analysis.flops import flop_table
from castling_det.data import register_coco_dataset

TASKS = ("flop", "parameter", "activation", "structure")


def build_inputs(cfg, args):
    """Single-image inputs: synthetic zeros of --input-size, or test-set images."""
    if args.input_size:
        height, width = args.input_size
        image = {"image": torch.zeros(3, height, width), "height": height, "width": width}
        return [image] * args.num_inputs
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    return [batch[0] for batch in itertools.islice(loader, args.num_inputs)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["flop"])
    parser.add_argument("--softmax-branch", choices=("on", "off"), default="off")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--num-inputs", type=int, default=1)
    parser.add_argument("--max-depth", type=int, default=4, help="module depth of the FLOP table")
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT")
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)

    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_castling_config(args.config_file, args.opts)
    model = build_model(cfg).eval()
    set_softmax_branch(model, args.softmax_branch == "on")

    with torch.no_grad():
        if "flop" in args.tasks or "activation" in args.tasks:
            inputs = build_inputs(cfg, args)
        if "flop" in args.tasks:
            print(f"FLOPs, softmax branch {args.softmax_branch}:")
            print(flop_table(model, inputs, args.max_depth))
        if "activation" in args.tasks:
            counts = [activation_count_operators(model, [single]) for single in inputs]
            total = sum(sum(c.values()) for c in counts) / len(counts)
            print(f"Activations: {total:.3f} M per input (mean over {len(inputs)})")
    if "parameter" in args.tasks:
        print(parameter_count_table(model, max_depth=args.max_depth))
    if "structure" in args.tasks:
        print(model)


def run():
    """Console entry point (`castling-analyze-model`)."""
    main()


if __name__ == "__main__":
    run()
