"""The evaluation hook that shows what the softmax branch costs and what switching it off changes."""
import json
import logging
import os
from typing import Callable, Dict

from detectron2.engine.hooks import EvalHook
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn

from ..modeling.branch import branch_modules, set_softmax_branch, softmax_branch

__all__ = ["SoftmaxBranchSwitch", "evaluate_with_branch", "format_switch_table"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "branch_switch.json"


class SoftmaxBranchSwitch(EvalHook):
    """Detectron2's :class:`EvalHook`, run twice: with the softmax branch on and with it off.

    At every ``eval_period`` iterations and after training it evaluates the model with the branch
    restored in full (scale 1: what the learned branch still contributes, whatever the annealing
    schedule has reached) and with it off (as deployed: linear in the token count), and measures
    the GFLOPs of each. Results go to the ``EventStorage`` as ``branch_on/bbox/AP``,
    ``branch_off/segm/AP50``, ``branch_on/gflops/backbone``, ..., to the log as a table and to
    ``branch_switch.json`` in ``output_dir`` (one record per evaluation). After training the model
    is left with the branch off. A model without linear-angular attention (a softmax baseline) is
    evaluated once, as ``branch_off``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        eval_period: int,
        evaluate: Callable[[], Dict],
        count_gflops: Callable[[nn.Module], Dict[str, float]],
        output_dir: str,
    ):
        """
        Args:
            model: the detector, not wrapped in DistributedDataParallel.
            eval_period: evaluate every this many iterations (0: only after training).
            evaluate: runs the evaluators on the test sets and returns their nested results.
            count_gflops: ``model -> {"model": ..., "backbone": ...}`` mean GFLOPs on test images.
            output_dir: where ``branch_switch.json`` is written.
        """
        super().__init__(eval_period, evaluate)
        self._model = model
        self._count_gflops = count_gflops
        self._output_dir = output_dir
        self.last_results: Dict[str, Dict] = {}

    def _do_eval(self):
        states = ("on", "off") if branch_modules(self._model) else ("off",)
        records = evaluate_with_branch(self._model, states, self._func, self._count_gflops)
        flat = {key: float(value) for key, value in flatten_results_dict(records).items()}
        self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        self.last_results = records
        if comm.is_main_process():
            logger.info("Softmax branch on and off:\n" + format_switch_table(records))
            self._append_record(records)
        comm.synchronize()

    def _append_record(self, records: Dict[str, Dict]) -> None:
        path = os.path.join(self._output_dir, RESULTS_FILE)
        history = []
        if os.path.exists(path):
            with open(path) as f:
                history = json.load(f)
        scales = {m.branch_scale for m in branch_modules(self._model)}
        # Iterations completed (after training, trainer.iter already equals max_iter).
        done = min(self.trainer.iter + 1, self.trainer.max_iter)
        history.append({"iteration": done, "train_branch_scale": max(scales, default=None), **records})
        tmp_path = path + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(history, f, indent=1)
        os.replace(tmp_path, path)

    def after_train(self):
        super().after_train()
        set_softmax_branch(self._model, False)


def evaluate_with_branch(
    model: nn.Module,
    states,
    evaluate: Callable[[], Dict],
    count_gflops: Callable[[nn.Module], Dict[str, float]],
) -> Dict[str, Dict]:
    """Evaluate ``model`` with its softmax branch in each of ``states`` (``"on"``: restored in full,
    at scale 1; ``"off"``: as deployed); each module's own setting is restored after.

    Returns:
        ``{"branch_on": {task: metrics, ..., "gflops": {...}}, "branch_off": {...}}`` for the states
        asked for; GFLOPs are counted on the main process only.
    """
    records = {}
    for state in states:
        with softmax_branch(model, state == "on", scale=1.0 if state == "on" else None):
            results = dict(evaluate() or {})
            if comm.is_main_process():
                results["gflops"] = count_gflops(model)
        records[f"branch_{state}"] = results
    return records


def format_switch_table(records: Dict[str, Dict]) -> str:
    """A table with one row per branch state: AP and AP50 of each task, and GFLOPs."""
    header, rows = ["softmax branch"], []
    for state, results in records.items():
        row = [state.replace("branch_", "")]
        for task, metrics in results.items():
            if task == "gflops":
                continue
            for metric in ("AP", "AP50"):
                if f"{task} {metric}" not in header:
                    header.append(f"{task} {metric}")
                row.append(f"{metrics[metric]:.2f}")
        for name, value in results.get("gflops", {}).items():
            if f"{name} GFLOPs" not in header:
                header.append(f"{name} GFLOPs")
            row.append(f"{value:.3f}")
        rows.append(row)
    return tabulate(rows, headers=header, tablefmt="pipe")
