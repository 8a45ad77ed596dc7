"""Checkpoints of castling_det: loaded as tensors only, with a readable report of what did not fit,
and written atomically."""
import logging
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CastlingCheckpointer", "load_pickled_weights"]

logger = logging.getLogger(__name__)


class _AtomicFile:
    """A file written at a temporary name beside ``path`` and renamed onto ``path`` once closed
    without error (deleted otherwise): readers find the old file or the whole new one."""

    def __init__(self, path: str, mode: str):
        self.path = path
        self.temporary_path = f"{path}.tmp-{os.getpid()}"
        self.file = open(self.temporary_path, mode)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())  # on disk before the rename makes it visible
        finally:
            self.file.close()
            if exc_type is None:
                os.replace(self.temporary_path, self.path)
            else:
                os.remove(self.temporary_path)
        return False


class _AtomicLocalWrites:
    """A path manager whose writes of local files go through :class:`_AtomicFile`; everything else
    is left to the wrapped one (fvcore writes checkpoints and ``last_checkpoint`` through ``open``)."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in path:
            return _AtomicFile(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


# What a ``.pkl`` of weights (Detectron2's and Detectron1's model zoos) may be rebuilt from: numpy
# arrays, their dtypes and scalars, ordered dicts, and ``_codecs.encode``, which protocol-2 pickles
# use to turn an array's raw data from text back into bytes. Nothing here runs code.
_PICKLED_WEIGHT_CLASSES = {
    (module, name)
    for numpy_core in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{numpy_core}.multiarray", "_reconstruct"),
        (f"{numpy_core}.multiarray", "scalar"),
        (f"{numpy_core}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds weights only: any other class or function is refused, by name."""

    def find_class(self, module, name):
        if (module, name) in _PICKLED_WEIGHT_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a .pkl checkpoint: only numpy arrays and "
            "dicts of them are read (a pickle can run code)"
        )


def load_pickled_weights(path: str) -> dict:
    """A ``.pkl`` checkpoint in Detectron2's form (``{"model": ..., "__author__": ...}``) or
    Detectron1/Caffe2's (``{"blobs": ...}`` or a bare dict of arrays), read with
    :class:`_WeightsUnpickler`, in the form ``DetectionCheckpointer`` loads.

    Raises:
        pickle.UnpicklingError: naming the first class the file needs that is not a weight.
    """
    with open(path, "rb") as f:
        data = _WeightsUnpickler(f, encoding="latin1").load()
    if "model" in data and "__author__" in data:
        return data
    weights = data.get("blobs", data)
    # Caffe2's solver state is no weight of the model.
    weights = {key: value for key, value in weights.items() if not key.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


class CastlingCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that unpickles with ``weights_only=True``, sums up
    the keys that did not load, and writes atomically.

    ``torch.load(weights_only=True)`` rebuilds tensors, containers and numbers only, so a
    checkpoint cannot run code when it is read (fvcore calls ``torch.load`` without it); a ``.pkl``
    is read by :func:`load_pickled_weights`, which rebuilds numpy arrays and nothing else.
    Weights of another architecture load as far as they fit; fvcore logs each missing,
    unexpected and wrongly shaped key, and one line here says how much of the model was loaded.

    A checkpoint and the ``last_checkpoint`` tag are each written to a temporary file and renamed
    into place, so a job killed while saving leaves the previous checkpoint loadable and tagged.
    """

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicLocalWrites(self.path_manager)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return load_pickled_weights(self.path_manager.get_local_path(filename))
        return super()._load_file(filename)

    def _torch_load(self, f):
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        model_keys = self.model.state_dict().keys()
        skipped = set(incompatible.missing_keys)
        skipped |= {key for key, _, _ in incompatible.incorrect_shapes}
        logger.info(
            "Loaded %d of %d model tensors; %d missing from the checkpoint, %d of another shape, "
            "%d in the checkpoint unused by the model (keys listed below).",
            len(model_keys - skipped), len(model_keys), len(incompatible.missing_keys),
            len(incompatible.incorrect_shapes), len(incompatible.unexpected_keys),
        )
        return incompatible
