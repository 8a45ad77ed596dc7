"""Exporting a deployed Castling-ViT detector (softmax branch off) to TorchScript and ONNX through
Detectron2's :class:`~detectron2.export.TracingAdapter`, and checking the exported model against
the eager one.

The adapter flattens the detector's ``list[dict]`` input into one image tensor, ``(3, H, W)`` as the
test loader gives it (already resized), and its ``Instances`` output into a tuple of tensors;
``adapter.outputs_schema`` turns the exported model's tensors back into ``Instances``. Outputs are in
the input image's pixels, before Detectron2's ``detector_postprocess`` rescales them to the original
image size (R-CNN models; RetinaNet's own forward rescales to the input size, i.e. not at all).
"""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from detectron2.export import TracingAdapter
from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from torch import nn

from .modeling import CastlingViT, branch_modules, set_softmax_branch

__all__ = [
    "EXPORT_FILE_NAMES",
    "EXPORT_FORMATS",
    "ExportComparison",
    "build_tracing_adapter",
    "compare_instances",
    "compare_on_images",
    "export_onnx",
    "export_torchscript",
    "fixed_input_grid_warning",
    "load_exported",
    "output_names",
    "prepare_for_export",
]

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# ONNX opset of the TorchScript-based exporter; onnxruntime 1.32 runs it, RoiAlign and NMS included.
ONNX_OPSET = 17


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Put ``model`` in the state it is exported in, in place: eval mode, the softmax branch off
    (the deployed, linear model) and ``COMPILE_TAIL`` off (``torch.compile`` cannot be traced; the
    eager operator it replaces computes the same function).

    Returns:
        The same model.
    """
    model.eval()
    set_softmax_branch(model, False)
    for module in branch_modules(model):
        module.compile_tail = False
    return model


def _rcnn_inference(model: GeneralizedRCNN, inputs: List[dict]) -> List[dict]:
    # Without detector_postprocess, whose rescaling to the original size needs per-image
    # Python numbers; the caller applies it to the exported model's output.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def build_tracing_adapter(model: nn.Module, image: torch.Tensor) -> TracingAdapter:
    """Detectron2's ``TracingAdapter`` around ``model`` for single images like ``image``.

    Args:
        model: a Detectron2 detector, prepared with :func:`prepare_for_export`.
        image: a ``(3, H, W)`` image as the test loader gives it (resized, ``INPUT.FORMAT``).

    Returns:
        A module ``adapter(image) -> tuple of tensors`` (``GeneralizedRCNN``: its outputs before
        ``detector_postprocess``; any other meta-architecture: its forward's outputs).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    # In eval mode itself: the ONNX exporter restores the adapter's own mode after exporting, and
    # a fresh module is in training mode, which would put the detector in it too.
    return TracingAdapter(model, [{"image": image}], inference).eval()


def fixed_input_grid_warning(adapter: TracingAdapter, image: torch.Tensor) -> Optional[str]:
    """A warning when a model traced on ``image`` would accept no other input size, else None.

    A traced graph keeps the shape arithmetic but not the Python branches taken while tracing.
    The one that matters here is in the position embedding: it is interpolated to the token grid
    unless the grid is exactly the one it is laid out for (``MODEL.CASTLING.PRETRAIN_IMG_SIZE``
    over the patch size); traced on that grid, the exported model fails on every other grid.
    """
    grids = []
    hooks = [
        vit.patch_embed.register_forward_hook(lambda module, args, out: grids.append(tuple(out.shape[1:3])))
        for vit in adapter.model.modules() if isinstance(vit, CastlingViT)
    ]
    try:
        with torch.no_grad():
            adapter(image)
    finally:
        for hook in hooks:
            hook.remove()
    vits = [vit for vit in adapter.model.modules() if isinstance(vit, CastlingViT)]
    for vit, grid in zip(vits, grids):
        side = int(round((vit.pos_embed.shape[1] - 1) ** 0.5))  # pos_embed holds a class token
        if grid == (side, side):
            return (
                f"the sample image of size {tuple(image.shape[1:])} gives the {side}x{side} token grid "
                "of the position embedding, which is then not interpolated: the exported model will "
                "accept only inputs of that grid. Trace on an image of another size to get a model "
                "for any size."
            )
    return None


def export_torchscript(adapter: TracingAdapter, image: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``adapter`` on ``image`` with ``torch.jit.trace`` and save the result to ``path``.

    Returns:
        The traced module.
    """
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
    traced.save(path)
    return traced


def output_names(adapter: TracingAdapter, image: torch.Tensor) -> Optional[List[str]]:
    """Names of the adapter's flat outputs for a detector that returns ``[{"instances": ...}]``:
    the ``Instances`` fields in the adapter's (sorted) order, then ``image_size``; None for any
    other output structure."""
    with torch.no_grad():
        adapter(image)  # sets adapter.outputs_schema
    schema = adapter.outputs_schema
    if not (isinstance(schema, ListSchema) and len(schema.schemas) == 1):
        return None
    per_image = schema.schemas[0]
    if not (isinstance(per_image, DictSchema) and per_image.keys == ["instances"]):
        return None
    instances = per_image.schemas[0]
    return [*instances.keys, "image_size"] if isinstance(instances, InstancesSchema) else None


def export_onnx(adapter: TracingAdapter, image: torch.Tensor, path: str, opset: int = ONNX_OPSET) -> None:
    """Export ``adapter`` to ONNX at ``path`` with PyTorch's TorchScript-based exporter (``dynamo=False``:
    the dynamo exporter needs ``onnxscript``, which is not a requirement here). The input is named
    ``image``, its height and width are dynamic axes, and the outputs are named as
    :func:`output_names` says (e.g. ``pred_boxes``, ``pred_classes``, ``scores``, ``image_size``)."""
    names = output_names(adapter, image)
    with torch.no_grad():
        torch.onnx.export(
            adapter, (image,), path, dynamo=False, opset_version=opset, input_names=["image"],
            output_names=names, dynamic_axes={"image": {1: "height", 2: "width"}},
        )


def load_exported(path: str) -> Callable[[torch.Tensor], tuple]:
    """Load an exported model as a function ``image -> tuple of tensors``: a ``.ts`` file with
    ``torch.jit.load``, a ``.onnx`` file in an onnxruntime CPU session.

    A TorchScript model calls torchvision's ``nms`` and ``roi_align``: a process of its own that
    loads it must ``import torchvision`` first (here Detectron2 has imported it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path!r}")
    if path.endswith(".ts"):
        return torch.jit.load(path)
    if path.endswith(".onnx"):
        import onnxruntime  # only needed to run ONNX models

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(image: torch.Tensor) -> tuple:
            return tuple(torch.from_numpy(a) for a in session.run(None, {input_name: image.numpy()}))

        return run
    raise ValueError(f"{path!r}: expected a .ts (TorchScript) or .onnx file")


@dataclass
class ExportComparison:
    """How far an exported model's detections on one image are from the eager model's, after
    pairing each eager detection with an exported one of the same class."""

    num_eager: int
    num_exported: int
    num_unmatched: int  # eager detections left without an exported one of their class
    max_box_diff: float  # max |Δ| of a box coordinate over the pairs, in input pixels
    max_score_diff: float
    max_mask_diff: Optional[float]  # max |Δ| of the mask probabilities (None: no masks)

    def matches(self, box_tol: float, score_tol: float = 1e-4, mask_tol: float = 1e-3) -> bool:
        """Whether the detections are the same: same count, all paired, within the tolerances."""
        return (
            self.num_eager == self.num_exported
            and self.num_unmatched == 0
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
            and (self.max_mask_diff is None or self.max_mask_diff <= mask_tol)
        )


def _pair_detections(eager: Instances, exported: Instances) -> List[tuple]:
    """Greedy pairs ``(i, j)`` of eager and exported detections of the same class, nearest box and
    score first: near-equal scores may come out in another order from another runtime."""
    cost = torch.cdist(eager.pred_boxes.tensor.double(), exported.pred_boxes.tensor.double(), p=float("inf"))
    cost = cost + (eager.scores.double()[:, None] - exported.scores.double()[None, :]).abs()
    cost[eager.pred_classes[:, None] != exported.pred_classes[None, :]] = float("inf")
    pairs = []
    for _ in range(min(len(eager), len(exported))):
        flat = int(torch.argmin(cost))
        i, j = divmod(flat, cost.shape[1])
        if not torch.isfinite(cost[i, j]):
            break
        pairs.append((i, j))
        cost[i, :] = float("inf")
        cost[:, j] = float("inf")
    return pairs


def compare_instances(eager: Instances, exported: Instances) -> ExportComparison:
    """Compare the detections of the eager and the exported model on the same image."""
    pairs = _pair_detections(eager, exported) if len(eager) and len(exported) else []
    index_eager = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    index_exported = torch.tensor([j for _, j in pairs], dtype=torch.long)

    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a[index_eager].double() - b[index_exported].double()).abs().max()) if pairs else 0.0

    max_mask_diff = None
    if eager.has("pred_masks"):
        max_mask_diff = max_diff(eager.pred_masks, exported.pred_masks)
    return ExportComparison(
        num_eager=len(eager),
        num_exported=len(exported),
        num_unmatched=len(eager) - len(pairs),
        max_box_diff=max_diff(eager.pred_boxes.tensor, exported.pred_boxes.tensor),
        max_score_diff=max_diff(eager.scores, exported.scores),
        max_mask_diff=max_mask_diff,
    )


def compare_on_images(
    adapter: TracingAdapter, exported: Callable[[torch.Tensor], tuple], images: Sequence[torch.Tensor]
) -> List[ExportComparison]:
    """Run the eager ``adapter`` and the ``exported`` model on each image and compare their
    detections (:func:`compare_instances`)."""
    comparisons = []
    with torch.no_grad():
        for image in images:
            eager_outputs = adapter(image)  # sets adapter.outputs_schema on a first call
            eager = adapter.outputs_schema(eager_outputs)[0]["instances"]
            outputs = adapter.outputs_schema(tuple(exported(image)))[0]["instances"]
            comparisons.append(compare_instances(eager, outputs))
    return comparisons
