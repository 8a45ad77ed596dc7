#!/usr/bin/env python
"""Train or evaluate a Castling-ViT detector from a yacs config, like Detectron2's train_net.py.

Examples:
    python tools/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_castling_vit_s_fpn_3x.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CONFIG \\
        --register-coco my_train data/train.json data/train_images DATASETS.TRAIN '("my_train",)'
"""
import logging
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser, default_setup, launch

from castling_det import add_castling_config
from castling_det.engine import CastlingTrainer

logger = logging.getLogger("castling_det")


def register_coco_datasets(specs) -> None:
    """Register each ``(name, json_file, image_root)`` as a COCO instances data set."""
    for name, json_file, image_root in specs:
        for what, path in (("annotation file", json_file), ("image directory", image_root)):
            if not Path(path).exists():
                raise FileNotFoundError(f"--register-coco {name}: {what} {path} does not exist")
        register_coco_instances(name, {}, json_file, image_root)


def setup(args):
    """Build the frozen config from the file and command-line overrides."""
    cfg = get_cfg()
    add_castling_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("No CUDA device: running on the CPU.")
    return cfg


def summarize(results) -> str:
    """One line per task (bbox, segm) with its AP and AP50, from the evaluators' results."""
    if results and all(isinstance(v, dict) and "AP" not in v for v in results.values()):
        per_dataset = results.items()  # several test sets: {dataset: {task: metrics}}
    else:
        per_dataset = [("", results)]
    lines = []
    for dataset, tasks in per_dataset:
        for task, metrics in tasks.items():
            prefix = f"{dataset} " if dataset else ""
            lines.append(f"{prefix}{task} AP = {metrics['AP']:.2f}, AP50 = {metrics['AP50']:.2f}")
    return "\n".join(lines)


def main(args):
    register_coco_datasets(args.register_coco)
    cfg = setup(args)
    if args.eval_only:
        model = CastlingTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = CastlingTrainer.test(cfg, model)
    else:
        trainer = CastlingTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if results:
        print(summarize(results), flush=True)
    return results


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format data set under NAME before training (repeatable)",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
