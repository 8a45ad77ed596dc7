"""Hooks that let a run killed at any point resume to the weights and metrics an uninterrupted run
of the same seed ends with.

Detectron2's checkpoints hold the model, optimizer, scheduler and iteration. What else decides
an iteration is (a) the batch, (b) the global RNGs (RPN and ROI sampling, drop-path), and, for
the logged metrics, (c) the recent values that writers take medians over. (a) comes from
:class:`~castling_det.data.train_loader.ResumableTrainLoader`, positioned by
:class:`IterationSeeding`, which also reseeds (b) every iteration; :class:`MetricHistoryCheckpoint`
saves and restores (c).
"""
import logging
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.train_loader import ResumableTrainLoader, derived_seed

__all__ = ["IterationSeeding", "MetricHistoryCheckpoint", "training_seed"]

logger = logging.getLogger(__name__)


def training_seed(seed: int) -> int:
    """``seed`` (the config's ``SEED``), or when it is negative a random seed shared by all processes."""
    return seed if seed >= 0 else int(comm.shared_random_seed())


class IterationSeeding(HookBase):
    """Seeds the global RNGs from (seed, rank, iteration) before every step, starts a
    :class:`ResumableTrainLoader` at the trainer's first iteration, and keeps the seed in
    checkpoints (a resumed run uses the seed it was started with)."""

    def __init__(self, seed: int, data_loader=None):
        self.seed = seed
        self.data_loader = data_loader

    def before_train(self):
        if isinstance(self.data_loader, ResumableTrainLoader):
            self.data_loader.start_at(self.trainer.iter, seed=self.seed)

    def before_step(self):
        seed = derived_seed(self.seed, comm.get_rank(), self.trainer.iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        if state_dict["seed"] != self.seed:
            logger.info("Resuming with the checkpoint's seed %d (not %d)", state_dict["seed"], self.seed)
        self.seed = state_dict["seed"]


class MetricHistoryCheckpoint(HookBase):
    """Keeps the last ``kept`` values of every logged scalar in checkpoints and puts them back into
    the event storage on resume.

    Detectron2's writers log medians over the last 20 values, so without this the first 20
    records after a resume would differ from an uninterrupted run's.
    """

    def __init__(self, kept: int = 100):
        self.kept = kept
        self._restored = {}

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        if storage is None:  # saved outside training: nothing logged yet
            return {}
        return {
            name: [[value, iteration] for value, iteration in buffer.values()[-self.kept:]]
            for name, buffer in storage.histories().items()
        }

    def load_state_dict(self, state_dict):
        # The event storage only exists once training starts: replayed in before_train.
        self._restored = state_dict

    def before_train(self):
        histories = self.trainer.storage.histories()
        for name, values in self._restored.items():
            for value, iteration in values:
                histories[name].update(value, iteration)
        self._restored = {}
