"""Checkpoint loading of castling_det: tensors only, and a readable report of what did not fit."""
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CastlingCheckpointer"]

logger = logging.getLogger(__name__)


class CastlingCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that unpickles with ``weights_only=True`` and sums up
    the keys that did not load.

    ``torch.load(weights_only=True)`` rebuilds tensors, containers and numbers only, so a
    checkpoint cannot run code when it is read (fvcore calls ``torch.load`` without it).
    Weights of another architecture load as far as they fit; fvcore logs each missing,
    unexpected and wrongly shaped key, and one line here says how much of the model was loaded.
    """

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
