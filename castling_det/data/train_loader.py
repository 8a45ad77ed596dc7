"""A training loader whose i-th batch is a function of (seed, i) alone, so that a resumed run sees
the batches an uninterrupted run would have seen.

Detectron2's ``TrainingSampler`` draws an endless shuffled stream whose position is not saved in
checkpoints, and its augmentations draw from each worker's global RNG: after ``--resume`` both
restart from scratch. Here the batch plan of every epoch is derived from (seed, epoch), each
record's augmentations from (seed, iteration, rank, slot), and a restart only needs the iteration.
"""
import contextlib
import logging
import random
from functools import lru_cache
from itertools import count
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "BatchPlan",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "derived_seed",
    "seeded_rngs",
]

logger = logging.getLogger(__name__)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (NumPy's ``SeedSequence`` mixes them)."""
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed Python's, NumPy's and PyTorch's (CPU) global RNGs, restoring their states on exit.

    Detectron2's augmentations draw from NumPy's global RNG; the restore keeps the caller's own
    random stream (the trainer's, when there are no loader workers) untouched.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class BatchPlan:
    """Which records form the global batch of each iteration.

    Every epoch, the records of each aspect-ratio group (landscape, portrait: Detectron2's
    grouping) are shuffled and cut into whole batches, the few left over from all groups are cut
    into mixed batches, and the batches are shuffled; the last partial batch is dropped. All of
    it is seeded by (seed, epoch), so batch ``i`` needs no state but ``i``.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int):
        """``groups[j]``: the aspect-ratio group of record ``j`` (one group: no grouping)."""
        self.groups = np.asarray(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self._epoch(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={batch_size} is larger than the training set "
                f"({len(self.groups)} images)"
            )

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> List[np.ndarray]:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        batches, leftovers = [], []
        for group in np.unique(self.groups):
            members = rng.permutation(np.flatnonzero(self.groups == group))
            whole = len(members) // self.batch_size * self.batch_size
            batches += np.split(members[:whole], whole // self.batch_size) if whole else []
            leftovers.append(members[whole:])
        mixed = np.concatenate(leftovers)
        whole = len(mixed) // self.batch_size * self.batch_size
        batches += np.split(mixed[:whole], whole // self.batch_size) if whole else []
        return [batches[j] for j in rng.permutation(len(batches))]

    def batch(self, iteration: int) -> List[int]:
        """The record indices of the global batch of ``iteration``."""
        epoch, position = divmod(iteration, self.batches_per_epoch)
        return self._epoch(epoch)[position].tolist()


class _PlannedBatches(IterableDataset):
    """This process's share of each planned batch, mapped, from ``start_iter`` on; loader
    worker ``w`` of ``W`` makes the batches of iterations ``start_iter + w + k·W``."""

    def __init__(self, records, mapper, plan: BatchPlan, start_iter: int, rank: int, world_size: int):
        self.records = records
        self.mapper = mapper
        self.plan = plan
        self.start_iter = start_iter
        self.rank = rank
        self.per_rank = plan.batch_size // world_size

    def __iter__(self):
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for iteration in count(self.start_iter + first, step):
            indices = self.plan.batch(iteration)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            yield [self._map(iteration, slot, index) for slot, index in enumerate(indices)]

    def _map(self, iteration: int, slot: int, index: int):
        with seeded_rngs(derived_seed(self.plan.seed, iteration, self.rank, slot)):
            mapped = self.mapper(self.records[index])
        if mapped is None:
            raise ValueError(
                f"The mapper returned None for training record {index} "
                f"({self.records[index].get('file_name', 'no file_name')}); the resumable loader "
                "replays a fixed plan and cannot replace records: drop it from the data set instead"
            )
        return mapped


class ResumableTrainLoader:
    """Endless iterable of training batches (lists of mapped records) that starts at any iteration.

    Batch ``i`` is the same whatever iteration the loader was started at, and whatever
    ``num_workers``; :meth:`start_at` positions it (the trainer does, after ``--resume``).
    """

    def __init__(
        self,
        records: Sequence[dict],
        mapper: Callable[[dict], dict],
        *,
        total_batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
    ):
        world_size = comm.get_world_size()
        if total_batch_size % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={total_batch_size} must be divisible by the number of processes "
                f"({world_size})"
            )
        # Serialised once: workers share the records' memory instead of copying Python objects.
        self.records = DatasetFromList(list(records), copy=False, serialize=True)
        self.mapper = mapper
        self.total_batch_size = total_batch_size
        self.groups = [int(r["width"] > r["height"]) if aspect_ratio_grouping else 0 for r in records]
        self.num_workers = num_workers
        self.seed = seed
        self.start_iter = 0

    def start_at(self, iteration: int, seed: Optional[int] = None) -> None:
        """Make the next ``iter()`` begin at the batch of ``iteration`` (with ``seed``, if given)."""
        self.start_iter = iteration
        if seed is not None:
            self.seed = seed

    def __iter__(self):
        plan = BatchPlan(self.groups, self.total_batch_size, self.seed)
        batches = _PlannedBatches(
            self.records, self.mapper, plan, self.start_iter, comm.get_rank(), comm.get_world_size()
        )
        # A generator of its own: starting workers would otherwise draw from the global RNG, at
        # iteration 0 in one run and at the resume iteration in the other.
        loader = DataLoader(
            batches,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            generator=torch.Generator().manual_seed(plan.seed),
        )
        return iter(loader)


def build_resumable_train_loader(cfg, mapper, seed: int) -> ResumableTrainLoader:
    """The :class:`ResumableTrainLoader` of ``cfg.DATASETS.TRAIN``, with Detectron2's record
    filtering (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, keypoint minimum) and batch settings."""
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
    )
    logger.info(
        "Training batches are planned from seed %d: a resumed run replays the same batches", seed
    )
    return ResumableTrainLoader(
        records,
        mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
