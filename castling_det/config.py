"""Config keys of castling_det: ``add_castling_config(cfg)`` adds ``MODEL.CASTLING.*`` and
``SOLVER.OPTIMIZER``, ``SOLVER.LR_DECAY_RATE``, ``SOLVER.AMP.DTYPE`` and ``TEST.FLOPS_NUM_IMAGES``."""
from typing import Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_castling_config", "load_castling_config"]


def load_castling_config(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None) -> CN:
    """Detectron2's default config with castling_det's keys, merged with ``config_file`` and the
    ``KEY VALUE`` overrides ``opts`` (not frozen).

    ``device`` sets ``MODEL.DEVICE``; without it a CUDA device falls back to the CPU on a machine
    without CUDA, so the COCO configs run anywhere.
    """
    cfg = add_castling_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if device is not None:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def add_castling_config(cfg: CN) -> CN:
    """Add castling_det's keys to a Detectron2 config, in place.

    The defaults describe a Castling-ViT-S read by the FPN adapter; the configs under ``configs/``
    set the rest (``MODEL.BACKBONE.NAME``, ``MODEL.FPN.*``, the heads).

    Returns:
        The same config, for chaining.
    """
    cfg.MODEL.CASTLING = CN()
    c = cfg.MODEL.CASTLING
    # Size preset: "Ti" (192 wide, 3 heads), "S" (384, 6) or "B" (768, 12), all 12 blocks deep.
    c.SIZE = "S"
    # Overrides of the preset's width, depth and head count when > 0 (e.g. tiny test models).
    c.EMBED_DIM = 0
    c.DEPTH = 0
    c.NUM_HEADS = 0
    # Side of the square patches; also the output stride of the ViT.
    c.PATCH_SIZE = 16
    # Input size the position embedding is laid out for (the pre-training size); interpolated.
    c.PRETRAIN_IMG_SIZE = 224
    # Attention of each block: "castling" (linear-angular), "softmax" (global) or "window"
    # (ViTDet-style windows). One entry applies to every block; otherwise one entry per block.
    c.ATTN_KINDS = ["castling"]
    # Window side, in tokens, of "window" blocks.
    c.WINDOW_SIZE = 14
    # Hidden width of the MLP over the token width.
    c.MLP_RATIO = 4.0
    # Whether the q, k, v projections have a bias.
    c.QKV_BIAS = True
    # Stochastic depth rate of the last block (rising linearly from 0 at the first).
    c.DROP_PATH_RATE = 0.1
    # Depthwise convolution on v: "seq" (the paper's k x 1 along the token sequence, per head)
    # or "grid" (k x k over the 2D token grid, per channel).
    c.CONV_KIND = "seq"
    # Its kernel size k (odd): 9 for "seq" as in the paper, 3 is usual for "grid".
    c.CONV_KERNEL_SIZE = 9
    # Learn a per-head weight of the linear term q^(k^T v)/pi against the constant 0.5 v (from 1,
    # the paper's value): a larger weight sharpens the near-uniform angular attention.
    c.LEARN_LINEAR_WEIGHT = False
    # With the branch off (deployed) and fp32/bf16 inputs, run the attention through
    # torch.compile's fused kernels (needs a C++ compiler on CPU). False: the eager reference.
    c.COMPILE_TAIL = False
    # With the branch off, at inference, run the fused deployed attention: on a CUDA GPU with
    # Triton installed two Triton kernels (head dims 16, 32, 64, 128; any dtype), on CPU a native
    # operator compiled on first use (the blocked Python one where no C++ compiler is found, and
    # for float64); and in bf16 on CPU, every
    # block's linear layers run as oneDNN calls with the bias (and fc1's GELU) inside the GEMM.
    # False: the eager references.
    c.FUSED_DEPLOYED = True
    # In inference on a CUDA GPU (branch off), run the ViT as CUDA graphs, one captured per input
    # shape (and dtype) on first sight and replayed after: kernel launches no longer bound it.
    # Each shape keeps its graph's memory; for detectors fed many image sizes, pad to few sizes.
    c.CUDA_GRAPHS = False
    # Recompute block activations in the backward pass to save memory.
    c.USE_ACT_CHECKPOINT = False
    # Feature maps returned by the bare backbone: "last_feat" and/or "block{i}" (0-based).
    # The FPN adapter reads the one named in MODEL.FPN.IN_FEATURES instead.
    c.OUT_FEATURES = ["last_feat"]

    # The auxiliary masked softmax branch, used in training and retired by its end
    # (castling_det/engine/branch_schedule.py explains the schedule).
    c.BRANCH = CN()
    # Whether the branch is on when the model is built.
    c.BRANCH.ENABLED = True
    # Which softmax weights the branch keeps: "absolute" (the paper's: above THRESHOLD),
    # "relative" (at least RELATIVE_THRESHOLD / N for N tokens: the same meaning at any N) or
    # "topk" (the TOPK largest of each query's row). "relative" is the default: it keeps the
    # above-average weights of any softmax, a fresh model's near-uniform one included, so the
    # branch carries signal from the first iteration. The paper's formula: MASK "absolute",
    # THRESHOLD 0.02, L1_WEIGHT 1.0.
    c.BRANCH.MASK = "relative"
    # Threshold of the "absolute" mask, a softmax weight. The paper's 0.02 keeps nothing of a
    # fresh model's near-uniform softmax (about 1/N per weight) once N > 50.
    c.BRANCH.THRESHOLD = 0.02
    # Threshold of the "relative" mask, in units of the uniform weight 1/N.
    c.BRANCH.RELATIVE_THRESHOLD = 1.0
    # Weights kept per query by the "topk" mask.
    c.BRANCH.TOPK = 32
    # Multiply the branch by N: a sum over tokens like the linear term q(k^T v), where the
    # paper's branch, a weighted average of v, is about 1/N of it (its share stays near 1 %).
    c.BRANCH.AS_SUM = False
    # Queries per chunk when computing the branch (exact; bounds its memory); 0: all at once.
    c.BRANCH.CHUNK_SIZE = 512
    # Final weight of the L1 penalty on the softmax mass the mask keeps (loss_branch_l1). Meant
    # for the "absolute" mask, which it empties; the others keep mass at any softmax, and on
    # them the penalty could only flatten it: with them it is 0 and ANNEAL_* retire the branch.
    c.BRANCH.L1_WEIGHT = 0.0
    # Fraction of training over which that weight ramps up linearly from 0.
    c.BRANCH.L1_RAMP_END = 0.5
    # Fractions of training where the branch's scale starts to fall from 1 (linearly) and
    # where it reaches exactly 0; from then on the branch is not computed at all.
    c.BRANCH.ANNEAL_START = 0.5
    c.BRANCH.ANNEAL_END = 0.8

    # Attention transfer, for "switching" a trained softmax model to Castling-ViT: with
    # MODEL.WEIGHTS a softmax twin's checkpoint (same ViT, ATTN_KINDS "softmax"), each castling
    # block's attention is trained to give what that checkpoint's frozen softmax attention gives
    # on the same input (castling_det/engine/attention_transfer.py explains the loss).
    c.TRANSFER = CN()
    # Weight of loss_attn_transfer; 0 turns attention transfer off.
    c.TRANSFER.LOSS_WEIGHT = 0.0
    # Fraction of training during which the loss applies (then the detector is fine-tuned alone).
    c.TRANSFER.END = 0.25

    # Optimizer: "SGD" or "ADAMW"; both read the other SOLVER.* keys.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Layer-wise learning-rate decay over the ViT blocks (1.0: none; ViTDet uses 0.7 for ViT-B).
    cfg.SOLVER.LR_DECAY_RATE = 1.0
    # Autocast dtype of SOLVER.AMP training: "float16" (CUDA, grad scaling) or "bfloat16" (CPU too).
    cfg.SOLVER.AMP.DTYPE = "float16"
    # Images whose GFLOPs the branch-switch evaluation averages (first of the first test set).
    cfg.TEST.FLOPS_NUM_IMAGES = 3
    return cfg
