"""The trainer of castling_det: Detectron2's DefaultTrainer with COCO evaluation and AdamW."""
import os

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .optimizer import build_optimizer

__all__ = ["CastlingTrainer"]


class CastlingTrainer(DefaultTrainer):
    """:class:`DefaultTrainer` that evaluates with :class:`COCOEvaluator` (boxes, and masks when
    the model predicts them) and builds its optimizer with :func:`build_optimizer`."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def train(self):
        """Run training; return the results of the last evaluation (None if none ran).

        Upstream returns them only when ``TEST.EXPECTED_RESULTS`` is set; the final evaluation
        (run by the EvalHook when training ends) is what a caller of the main job wants.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)
