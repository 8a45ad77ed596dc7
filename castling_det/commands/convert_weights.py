"""Convert a softmax-ViT checkpoint (timm ``vit_*``/DeiT, MAE, Detectron2/ViTDet) into the weights
of the Castling-ViT detector a config describes, loadable with ``MODEL.WEIGHTS``.

The output holds ``{"model": state_dict}`` with the ViT's tensors under the detector's key names
(``backbone.net.*``); the pyramid and heads are not written and keep the model's own
initialisation. How each part is mapped or initialised: ``castling_det/convert/converter.py``.
A table of matched, converted, new and dropped keys is printed.

Examples:
    python tools/convert_weights.py --input vit_tiny_patch16_224.pth --output vit_ti_castling.pth \\
        --config-file configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml
    python tools/convert_weights.py --source mae --input mae_pretrain_vit_base.pth --output out.pth \\
        --config-file configs/COCO-Detection/faster_rcnn_castling_vit_b_fpn_3x.yaml \\
        MODEL.CASTLING.PRETRAIN_IMG_SIZE 224
"""
import argparse
import os
import sys

import torch
from detectron2.modeling import build_model

from castling_det import load_castling_config
from castling_det.convert import SOURCE_FORMATS, convert_checkpoint


def build_target(config_file: str, opts) -> torch.nn.Module:
    """The detector a config describes, built on the CPU (only its keys and shapes are used)."""
    return build_model(load_castling_config(config_file, opts, device="cpu"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the source checkpoint (.pth, .pt, .bin)")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    parser.add_argument("--config-file", required=True, help="config of the target detector")
    parser.add_argument(
        "--source", choices=("auto",) + SOURCE_FORMATS, default="auto",
        help="format of --input (default: tell by its keys)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides as KEY VALUE pairs, as in tools/train_net.py",
    )
    args = parser.parse_args(argv)
    if all(map(os.path.exists, (args.input, args.output))) and os.path.samefile(args.input, args.output):
        parser.error(f"--output {args.output!r} is the input file")
    try:
        converted, report = convert_checkpoint(
            args.input, build_target(args.config_file, args.opts), args.source
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"convert_weights: error: {error}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": converted}, args.output)
    print(report.format())
    print(f"Wrote {len(converted)} tensors to {args.output}; train with MODEL.WEIGHTS {args.output}")


def run():
    """Console entry point (`castling-convert-weights`)."""
    main()


if __name__ == "__main__":
    run()
