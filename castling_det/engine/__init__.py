"""Training: the trainer, its optimizer, the hooks that retire and switch the softmax branch, and
attention transfer from a softmax twin."""
from .attention_transfer import AttentionTransfer, build_attention_transfer
from .branch_schedule import BranchRegularizer, BranchSchedule
from .branch_switch import SoftmaxBranchSwitch, evaluate_with_branch, format_switch_table
from .checkpoint import CastlingCheckpointer
from .optimizer import build_optimizer
from .reproducibility import IterationSeeding, MetricHistoryCheckpoint, training_seed
from .train_loop import AutocastTrainer, build_train_loop
from .trainer import CastlingTrainer, build_checked_test_loader, count_test_gflops, unwrap_model

__all__ = [
    "AttentionTransfer",
    "BranchRegularizer",
    "AutocastTrainer",
    "BranchSchedule",
    "CastlingCheckpointer",
    "CastlingTrainer",
    "IterationSeeding",
    "MetricHistoryCheckpoint",
    "SoftmaxBranchSwitch",
    "build_attention_transfer",
    "build_checked_test_loader",
    "build_optimizer",
    "build_train_loop",
    "count_test_gflops",
    "evaluate_with_branch",
    "format_switch_table",
    "training_seed",
    "unwrap_model",
]
