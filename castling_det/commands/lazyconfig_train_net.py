"""Train or evaluate a Castling-ViT detector from a LazyConfig, like Detectron2's lazyconfig_train_net.py.

Training uses the same machinery as tools/train_net.py: the softmax branch is retired by the schedule
in ``train.branch`` and every evaluation runs with the branch on and off, with GFLOPs.

Examples:
    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/lazy/mask_rcnn_castling_vit_b_100ep.py
    python tools/lazyconfig_train_net.py --config-file CONFIG --eval-only train.init_checkpoint=CKPT
    python tools/lazyconfig_train_net.py --config-file CONFIG train.device=cpu train.amp.enabled=False \\
        dataloader.train.total_batch_size=2
"""
import itertools

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from castling_det.analysis import count_gflops
from castling_det.engine import (
    BranchRegularizer,
    BranchSchedule,
    CastlingCheckpointer,
    IterationSeeding,
    MetricHistoryCheckpoint,
    SoftmaxBranchSwitch,
    evaluate_with_branch,
    training_seed,
    unwrap_model,
)
from castling_det.engine.train_loop import make_train_loop
from castling_det.engine.cli import (
    eval_branch_states,
    launch_training_tool,
    print_switch_table,
    register_datasets,
    setup_castling_logger,
)


def do_test(cfg, model):
    """Run the configured evaluator on the test loader; return its results."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def test_gflops(cfg, model):
    """Mean GFLOPs on the first ``train.flops_num_images`` test images."""
    count = cfg.train.get("flops_num_images", 3)
    inputs = [batch[0] for batch in itertools.islice(instantiate(cfg.dataloader.test), count)]
    if not inputs:
        return {}
    return count_gflops(unwrap_model(model), inputs, modules=("backbone", "backbone.net"))


def _config_seed(cfg) -> int:
    """``train.seed``; -1 (a random seed) when it is unset or None."""
    seed = cfg.train.get("seed")
    return -1 if seed is None else seed


def do_train(args, cfg):
    """Build model, optimizer and data, then train with the branch schedule and switch hooks."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    bare_model = model
    # PyTorch rejects device_ids for a model on the CPU (multi-process Gloo training).
    ddp_kwargs = {"device_ids": None} if cfg.train.device == "cpu" else {}
    model = create_ddp_model(model, **cfg.train.ddp, **ddp_kwargs)
    # train.amp.dtype (castling_det's key): "float16" (CUDA, Detectron2's AMPTrainer) or "bfloat16"
    # (any device).
    amp_dtype = cfg.train.amp.get("dtype", "float16") if cfg.train.amp.enabled else None
    trainer = make_train_loop(
        model, train_loader, optimizer, amp_dtype=amp_dtype, dtype_key="train.amp.dtype"
    )
    checkpointer = CastlingCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    switch = SoftmaxBranchSwitch(
        model=bare_model,
        eval_period=cfg.train.eval_period,
        evaluate=lambda: do_test(cfg, model),
        count_gflops=lambda m, _dataset_name: test_gflops(cfg, m),
        output_dir=cfg.train.output_dir,
    )
    writers = default_writers(cfg.train.output_dir, cfg.train.max_iter)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            # The model's randomness and logged metrics resume exactly; the LazyConfig's loader
            # (Detectron2's) restarts its sampler.
            IterationSeeding(training_seed(_config_seed(cfg)), train_loader),
            BranchRegularizer(bare_model, BranchSchedule(max_iter=cfg.train.max_iter, **cfg.train.branch)),
            MetricHistoryCheckpoint(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            switch,
            hooks.PeriodicWriter(writers, period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return switch.last_results


def main(args):
    states = eval_branch_states(args)
    register_datasets(args)
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_castling_logger(cfg.train.output_dir)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        CastlingCheckpointer(model).load(cfg.train.init_checkpoint)
        records = evaluate_with_branch(
            model, states, lambda: do_test(cfg, model),
            lambda m, _dataset_name: test_gflops(cfg, m),
        )
    else:
        records = do_train(args, cfg)
    return print_switch_table(records)


def run():
    """Console entry point (`castling-lazyconfig-train`)."""
    launch_training_tool(main)


if __name__ == "__main__":
    run()
