"""The trainer of castling_det: Detectron2's DefaultTrainer with the softmax-branch machinery."""
import itertools
import logging
import os
import weakref

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..analysis import count_gflops
from ..data import CheckedDatasetMapper, build_resumable_train_loader
from .attention_transfer import build_attention_transfer, zero_missing_convolutions
from .branch_schedule import BranchRegularizer, BranchSchedule
from .branch_switch import SoftmaxBranchSwitch
from .checkpoint import CastlingCheckpointer
from .optimizer import build_optimizer
from .reproducibility import IterationSeeding, MetricHistoryCheckpoint, training_seed
from .train_loop import build_train_loop

__all__ = ["CastlingTrainer", "build_checked_test_loader", "count_test_gflops", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def build_checked_test_loader(cfg, dataset_name):
    """Detectron2's test loader of ``dataset_name``, with images read by
    :class:`CheckedDatasetMapper` (any pixel format, errors that name the file)."""
    mapper = CheckedDatasetMapper(cfg, is_train=False, dataset_names=(dataset_name,))
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


def count_test_gflops(cfg, model, dataset_name=None):
    """Mean GFLOPs of ``model`` on the first ``TEST.FLOPS_NUM_IMAGES`` images of the test set
    ``dataset_name`` (default: the first of ``DATASETS.TEST``): ``{"model": ..., "backbone": ...,
    "backbone.net": ...}`` (``{}`` without a test set)."""
    if not cfg.DATASETS.TEST or cfg.TEST.FLOPS_NUM_IMAGES < 1:
        return {}
    loader = build_checked_test_loader(cfg, dataset_name or cfg.DATASETS.TEST[0])
    inputs = [batch[0] for batch in itertools.islice(loader, cfg.TEST.FLOPS_NUM_IMAGES)]
    return count_gflops(unwrap_model(model), inputs, modules=("backbone", "backbone.net"))


class CastlingTrainer(DefaultTrainer):
    """:class:`DefaultTrainer` for Castling-ViT detectors.

    - reads images with :class:`CheckedDatasetMapper` (grey, alpha and 16-bit images as 8-bit
      3-channel pixels; an unreadable file named in the error);
    - evaluates with :class:`COCOEvaluator` (boxes, and masks when the model predicts them);
    - builds the optimizer with :func:`build_optimizer` (AdamW, layer-wise lr decay, clipping);
    - adds :class:`BranchRegularizer`, which retires the softmax branch over training;
    - with ``MODEL.CASTLING.TRANSFER.LOSS_WEIGHT > 0``, switches a softmax twin's checkpoint
      (``MODEL.WEIGHTS``) to Castling-ViT by attention transfer (:class:`AttentionTransfer`);
    - evaluates through :class:`SoftmaxBranchSwitch` (branch on and off, with GFLOPs) in place of
      Detectron2's ``EvalHook``; the model is left with the branch off after training;
    - trains in several CPU processes (Gloo) too;
    - stops at the first non-finite loss term, naming it, and trains under bfloat16 autocast on
      the CPU too (``SOLVER.AMP.DTYPE``; :func:`build_train_loop`);
    - loads checkpoints with ``weights_only=True`` and writes them atomically
      (:class:`CastlingCheckpointer`);
    - resumes exactly: batch ``i`` depends only on (seed, ``i``) (:class:`ResumableTrainLoader`),
      the RNGs are reseeded every iteration (:class:`IterationSeeding`) and checkpoints keep the
      recent metric values (:class:`MetricHistoryCheckpoint`), so a run killed and resumed ends
      with the weights and metrics of an uninterrupted one.
    """

    def __init__(self, cfg):
        # The same construction as DefaultTrainer's, but for the DDP wrapper: upstream passes
        # device_ids=[local_rank], which PyTorch rejects for a model on the CPU.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.seed = training_seed(cfg.SEED)
        data_loader = self.build_train_loader(cfg, seed=self.seed)
        on_cpu = next(model.parameters()).device.type == "cpu"
        ddp_kwargs = {"device_ids": None} if on_cpu else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = CastlingCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg, seed=None):
        """A :class:`ResumableTrainLoader` with batches planned from ``seed`` (default: from
        ``cfg.SEED``); Detectron2's loader for samplers other than ``TrainingSampler``."""
        mapper = CheckedDatasetMapper(cfg, is_train=True, dataset_names=cfg.DATASETS.TRAIN)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                "DATALOADER.SAMPLER_TRAIN=%s: using Detectron2's loader, whose position is not "
                "checkpointed, so a resumed run will see other batches than an uninterrupted one",
                cfg.DATALOADER.SAMPLER_TRAIN,
            )
            return build_detection_train_loader(cfg, mapper=mapper)
        return build_resumable_train_loader(cfg, mapper, training_seed(cfg.SEED) if seed is None else seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_checked_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        model = unwrap_model(self.model)
        built = super().build_hooks()
        transfer = self._build_attention_transfer(model)
        eval_at = next(i for i, hook in enumerate(built) if isinstance(hook, hooks.EvalHook))
        self.branch_switch = SoftmaxBranchSwitch(
            model=model,
            eval_period=self.cfg.TEST.EVAL_PERIOD,
            evaluate=lambda: self.test(self.cfg, self.model),
            count_gflops=lambda m, dataset_name: count_test_gflops(self.cfg, m, dataset_name),
            output_dir=self.cfg.OUTPUT_DIR,
            dataset_names=self.cfg.DATASETS.TEST or (None,),
        )
        built[eval_at] = self.branch_switch
        # Right after the IterationTimer, so the RNGs and the schedule are set before anything
        # else runs.
        built[1:1] = [
            IterationSeeding(self.seed, self.data_loader),
            BranchRegularizer(model, BranchSchedule.from_config(self.cfg)),
            MetricHistoryCheckpoint(),
        ] + ([transfer] if transfer else [])
        return built

    def _build_attention_transfer(self, model):
        """The :class:`AttentionTransfer` hook that ``MODEL.CASTLING.TRANSFER`` asks for, or None;
        keeps the teacher checkpoint's tensors until :meth:`resume_or_load` has used them."""
        hook, self._teacher_state = build_attention_transfer(self.cfg, model)
        return hook

    def resume_or_load(self, resume=True):
        """Detectron2's resume-or-load; when switching from a softmax twin (not resuming), the
        depthwise convolutions the teacher checkpoint lacks then start at zero."""
        super().resume_or_load(resume=resume)
        if self._teacher_state is not None and self.start_iter == 0:
            zeroed = zero_missing_convolutions(unwrap_model(self.model), self._teacher_state)
            logger.info("Switching from %s: %d depthwise convolutions start at zero.", self.cfg.MODEL.WEIGHTS, zeroed)
        self._teacher_state = None

    def train(self):
        """Run training; return the last evaluation, ``{"branch_on": ..., "branch_off": ...}``."""
        super().train()
        return self.branch_switch.last_results if comm.is_main_process() else {}
