# Castling-ViT-B Mask R-CNN, ViTDet's COCO recipe: large-scale jitter, 100 epochs, AdamW (with
# ViTDet's layer-wise lr decay once fine-tuning a pretrained ViT). Train with
# tools/lazyconfig_train_net.py.
from functools import partial

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.coco_loader_lsj import dataloader  # noqa: F401  (part of the config)
from .models.mask_rcnn_castling_vit import model  # noqa: F401  (part of the config)

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""  # no pretrained Castling-ViT exists yet: from scratch unless you set one
train.amp.enabled = True
train.ddp.fp16_compression = True
# 100 epochs of COCO train2017 (118k images) at 64 images per iteration:
# 100 * 118000 / 64 = 184375 iterations.
train.max_iter = 184375
train.eval_period = 10000
# The softmax branch's retirement (castling_det/engine/branch_schedule.py), fractions of max_iter:
# annealed from half of training, with no L1 penalty (the relative mask keeps mass at any softmax).
train.branch = dict(l1_weight=0.0, l1_ramp_end=0.5, anneal_start=0.5, anneal_end=0.8)
# Images whose GFLOPs the branch-switch evaluation averages.
train.flops_num_images = 3

# Decay 10x at 88.9 and 96.3 epochs (163889 and 177546 iterations), after a 250-iteration warm-up.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates="${train.max_iter}",
    ),
    warmup_length=250 / 184375,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
# Layer-wise lr decay is for fine-tuning: from scratch (init_checkpoint "") every block learns at
# the full rate; ViTDet's 0.7 would give block 0 0.7^12 = 1.4 % of it. Set 0.7 with a pretrained ViT.
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=1.0)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
