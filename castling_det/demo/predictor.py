"""One image in, the detector's predictions out, with the softmax branch on or off."""
import os

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..engine.checkpoint import CastlingCheckpointer
from ..modeling.branch import set_branch_scale, set_softmax_branch

__all__ = ["BranchPredictor"]


class BranchPredictor:
    """Detectron2's ``DefaultPredictor`` for castling_det: the model built from ``cfg``, its
    weights loaded with :class:`CastlingCheckpointer` (``weights_only``), the softmax branch set.

    ``softmax_branch_on=False`` runs the model as deployed (linear in the token count); ``True``
    restores the branch in full (scale 1), as the switch hook evaluates it.
    """

    def __init__(self, cfg, softmax_branch_on: bool = False):
        weights = cfg.MODEL.WEIGHTS
        if not weights:
            raise ValueError(
                "MODEL.WEIGHTS is empty: name the checkpoint to run, e.g. MODEL.WEIGHTS model_final.pth"
            )
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint {weights} does not exist")
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: the demo reads RGB or BGR models only")
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        CastlingCheckpointer(self.model).load(weights)
        set_softmax_branch(self.model, softmax_branch_on)
        if softmax_branch_on:
            set_branch_scale(self.model, 1.0)
        self.resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, image_rgb: np.ndarray) -> dict:
        """The model's output for one HWC uint8 RGB image (``{"instances": ...}`` for a detector),
        in the image's own size, on the CPU."""
        image = image_rgb if self.input_format == "RGB" else image_rgb[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32)
        inputs = {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}
        with torch.inference_mode():
            (output,) = self.model([inputs])
        if "instances" in output:
            output["instances"] = output["instances"].to("cpu")
        return output
