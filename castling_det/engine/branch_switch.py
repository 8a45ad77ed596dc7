"""The evaluation hook that shows what the softmax branch costs and what switching it off changes."""
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

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
    the GFLOPs of each on every test set. Results go

    - to the ``EventStorage`` as ``branch_on/bbox/AP``, ``branch_off/segm/AP50``,
      ``branch_on/gflops/backbone``, ... and, for the deployed model, under Detectron2's own keys
      (``bbox/AP``, ...), which ``BestCheckpointer(val_metric="bbox/AP")`` and other hooks read;
      with several test sets each key has the data set's name after the state
      (``branch_off/val2/bbox/AP``, ``val2/bbox/AP``), as Detectron2 names them;
    - to ``trainer._last_eval_results`` (the deployed model's), which ``DefaultTrainer.train``
      checks against ``TEST.EXPECTED_RESULTS``;
    - to the log as a table per test set, and to ``branch_switch.json`` in ``output_dir`` (one
      record per evaluation).

    After training the model is left with the branch off. A model without linear-angular attention
    (a softmax baseline) is evaluated once, as ``branch_off``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        eval_period: int,
        evaluate: Callable[[], Dict],
        count_gflops: Callable[[nn.Module, Optional[str]], Dict[str, float]],
        output_dir: str,
        dataset_names: Sequence[Optional[str]] = (None,),
    ):
        """
        Args:
            model: the detector, not wrapped in DistributedDataParallel.
            eval_period: evaluate every this many iterations (0: only after training).
            evaluate: runs the evaluators on the test sets and returns their results as
                ``DefaultTrainer.test`` does: ``{task: metrics}`` for one test set,
                ``{dataset: {task: metrics}}`` for several.
            count_gflops: ``(model, dataset_name) -> {"model": ..., "backbone": ...}``, mean
                GFLOPs on that test set's first images.
            output_dir: where ``branch_switch.json`` is written.
            dataset_names: the test sets, in ``evaluate``'s order.
        """
        super().__init__(eval_period, evaluate)
        self._model = model
        self._count_gflops = count_gflops
        self._dataset_names = tuple(dataset_names)
        self._output_dir = output_dir
        self.last_results: Dict[str, Dict] = {}

    def before_train(self):
        # A run resumed from a checkpoint taken at an evaluation point whose evaluation was cut
        # short (a session ended during it) evaluates that checkpoint first, with its scalars
        # stored at the iteration the uninterrupted run gives them: the curve keeps its point.
        done = self.trainer.iter  # the iterations the resumed checkpoint has completed
        due = self._period > 0 and done % self._period == 0 and 0 < done < self.trainer.max_iter
        if not due or done in self._recorded_iterations():
            return
        logger.info(f"Resumed at iteration {done}, whose evaluation is missing: evaluating it first.")
        storage = self.trainer.storage
        storage.iter = done - 1
        try:
            self._do_eval(done)
        finally:
            storage.iter = done

    def _recorded_iterations(self) -> set:
        """The iterations ``branch_switch.json`` in the output folder holds evaluations of."""
        path = os.path.join(self._output_dir, RESULTS_FILE)
        if not os.path.exists(path):
            return set()
        with open(path) as f:
            return {record["iteration"] for record in json.load(f)}

    def _do_eval(self, done: Optional[int] = None):
        """Evaluate with the branch on and off; ``done``: the iterations completed (by default
        the trainer's, as in Detectron2's hook)."""
        states = ("on", "off") if branch_modules(self._model) else ("off",)
        records = evaluate_with_branch(
            self._model, states, self._func, self._count_gflops, self._dataset_names
        )
        deployed = _without_gflops(records["branch_off"])
        flat = {**flatten_results_dict(records), **flatten_results_dict(deployed)}
        self.trainer.storage.put_scalars(**{k: float(v) for k, v in flat.items()}, smoothing_hint=False)
        # What DefaultTrainer's own evaluation hook keeps, for its TEST.EXPECTED_RESULTS check.
        self.trainer._last_eval_results = deployed
        self.last_results = records
        if comm.is_main_process():
            logger.info("Softmax branch on and off:\n" + format_switch_table(records))
            # Iterations completed (after training, trainer.iter already equals max_iter).
            self._append_record(records, done or min(self.trainer.iter + 1, self.trainer.max_iter))
        comm.synchronize()

    def _append_record(self, records: Dict[str, Dict], done: int) -> None:
        path = os.path.join(self._output_dir, RESULTS_FILE)
        history = []
        if os.path.exists(path):
            with open(path) as f:
                history = json.load(f)
        scales = {m.branch_scale for m in branch_modules(self._model)}
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
    count_gflops: Callable[[nn.Module, Optional[str]], Dict[str, float]],
    dataset_names: Sequence[Optional[str]] = (None,),
) -> Dict[str, Dict]:
    """Evaluate ``model`` with its softmax branch in each of ``states`` (``"on"``: restored in full,
    at scale 1; ``"off"``: as deployed); each module's own setting is restored after.

    ``evaluate`` and ``count_gflops`` are as in :class:`SoftmaxBranchSwitch`.

    Returns:
        For one test set ``{"branch_on": {task: metrics, ..., "gflops": {...}}, "branch_off":
        {...}}``, for several ``{"branch_on": {dataset: {task: metrics, ..., "gflops": {...}}},
        ...}``, for the states asked for; GFLOPs are counted on the main process only.
    """
    records = {}
    for state in states:
        with softmax_branch(model, state == "on", scale=1.0 if state == "on" else None):
            results = dict(evaluate() or {})
            if comm.is_main_process():
                if len(dataset_names) > 1:
                    for name in dataset_names:
                        results[name] = {**results.get(name, {}), "gflops": count_gflops(model, name)}
                else:
                    results["gflops"] = count_gflops(model, dataset_names[0])
        records[f"branch_{state}"] = results
    return records


def _without_gflops(results: Dict) -> Dict:
    """Evaluation results as Detectron2 returns them: ``results`` less every ``"gflops"`` entry."""
    return {
        key: _without_gflops(value) if isinstance(value, dict) else value
        for key, value in results.items()
        if key != "gflops"
    }


def _is_per_dataset(results: Dict) -> bool:
    """Whether ``results`` is keyed by test set (``{dataset: {task: {"AP": ...}}}``) rather than
    by task (``{task: {"AP": ...}}``)."""
    return any(
        isinstance(task, dict) and "AP" in task
        for value in results.values() if isinstance(value, dict)
        for task in value.values()
    )


def format_switch_table(records: Dict[str, Dict]) -> str:
    """One table per test set, with one row per branch state: AP and AP50 of each task, and
    GFLOPs (a single table, without a title, for one test set)."""
    first = next(iter(records.values()), {})
    if not _is_per_dataset(first):
        return _switch_table(records)
    return "\n\n".join(
        f"{name}:\n" + _switch_table({state: results[name] for state, results in records.items()})
        for name in first
    )


def _switch_table(records: Dict[str, Dict]) -> str:
    """The table of one test set."""
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
