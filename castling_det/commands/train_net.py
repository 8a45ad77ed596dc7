"""Train or evaluate a Castling-ViT detector from a yacs config, like Detectron2's train_net.py.

Training evaluates with the softmax branch on and off (SoftmaxBranchSwitch) and prints that
table at the end; ``--eval-only`` evaluates with the branch off (as deployed) unless asked
otherwise with ``--softmax-branch on|both``.

Examples:
    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_castling_vit_s_fpn_3x.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CONFIG --num-gpus 2          # 2 processes (Gloo on CPU)
    python tools/train_net.py --config-file CONFIG \\
        --register-coco my_train data/train.json data/train_images DATASETS.TRAIN '("my_train",)'
    python tools/train_net.py --config-file CONFIG \\
        --register-voc bccd_train ../shared/datasets/bccd train RBC,WBC,Platelets
"""
from detectron2.engine import default_setup

from castling_det import load_castling_config
from castling_det.engine import (
    CastlingCheckpointer,
    CastlingTrainer,
    count_test_gflops,
    evaluate_with_branch,
)
from castling_det.engine.cli import (
    eval_branch_states,
    launch_training_tool,
    print_switch_table,
    register_datasets,
    setup_castling_logger,
)


def setup(args):
    """Build the frozen config from the file and command-line overrides."""
    cfg = load_castling_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_castling_logger(cfg.OUTPUT_DIR)
    return cfg


def main(args):
    states = eval_branch_states(args)
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = CastlingTrainer.build_model(cfg)
        CastlingCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        records = evaluate_with_branch(
            model,
            states,
            lambda: CastlingTrainer.test(cfg, model),
            lambda m, dataset_name: count_test_gflops(cfg, m, dataset_name),
            cfg.DATASETS.TEST or (None,),
        )
    else:
        trainer = CastlingTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        records = trainer.train()
    return print_switch_table(records)


def run():
    """Console entry point (`castling-train`)."""
    launch_training_tool(main)


if __name__ == "__main__":
    run()
