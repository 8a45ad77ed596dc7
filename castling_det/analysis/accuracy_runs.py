"""The BCCD accuracy ablation of ``castling_det.commands.benchmark_accuracy``: schedules, run
plans, result files and the report's tables.

A run is one (schedule, arm, seed). It trains in ``{work_dir}/{schedule}/{arm}-seed{seed}`` and,
once it has ended, its result is stored in ``{results_dir}/{schedule}/{arm}-seed{seed}.json``.
Everything here is plain data in and out (no model, no subprocess); the command trains, and
accuracy_figures draws the figures.

Schedules:

* ``curve``: the learning curve, 2400 iterations evaluated every 300.
* ``iters{S}`` (S a multiple of 8): S iterations, learning-rate steps at 80 % and 95 %, four
  evaluations, and a checkpoint at exactly S/2 iterations (the switching arm's teacher).
"""
import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .branch_stats import branch_markdown, has_branch
from .seed_noise import difference_markdown

__all__ = [
    "AblationError",
    "Arm",
    "CURVE",
    "RunPlan",
    "Schedule",
    "build_result",
    "check_teacher",
    "checkpoint_name",
    "checkpoint_period",
    "curve_points",
    "final_ap_by_arm",
    "format_mean_std",
    "group_results",
    "half_schedule",
    "load_results",
    "load_run_time",
    "lr_steps",
    "mean_std",
    "parse_schedule",
    "plan_run",
    "prune_checkpoints",
    "reduce_evaluations",
    "result_path",
    "results_markdown",
    "run_decision",
    "run_finished",
    "run_dir",
    "schedule_overrides",
    "summarize_arm",
    "write_json_atomic",
    "write_text_atomic",
]

CURVE = "curve"
# Written by the tool next to the run: its timed segments (a resumed run has several).
RUN_TIME_FILE = "runner_time.json"
# Written by castling_det.engine.SoftmaxBranchSwitch: one record per evaluation.
SWITCH_FILE = "branch_switch.json"
MAX_CHECKPOINT_PERIOD = 200


class AblationError(Exception):
    """A run cannot be planned or started: unknown schedule or arm, missing data or teacher."""


class Arm(NamedTuple):
    """One arm of the ablation.

    Attributes:
        description: one line for the report.
        overrides: yacs ``KEY VALUE`` pairs, flattened, added to every run of the arm.
        switch_from: the arm whose checkpoint at half the schedule this arm starts from (it then
            trains the other half); None trains from scratch for the whole schedule.
    """

    description: str
    overrides: Tuple[str, ...]
    switch_from: Optional[str] = None


@dataclass(frozen=True)
class Schedule:
    """A schedule's name and the solver settings it sets."""

    name: str
    max_iter: int
    steps: Tuple[int, int]
    eval_period: int
    checkpoint_period: int


class RunPlan(NamedTuple):
    """Everything the tool needs to train, resume or record one (schedule, arm, seed)."""

    schedule: str
    arm: str
    description: str
    seed: int
    output_dir: Path
    result_file: Path
    overrides: List[str]  # every yacs override passed to train_net, OUTPUT_DIR first
    extra_opts: List[str]  # those added on the command line, last in ``overrides``
    own_iterations: int
    total_iterations: int  # own plus the teacher's
    teacher_checkpoint: Optional[Path]
    keep_checkpoint: Optional[str]  # the intermediate checkpoint a switching arm will need


def checkpoint_period(iterations: int) -> int:
    """The largest divisor of ``iterations / 2`` that is at most 200, so that a checkpoint falls
    on exactly half of training (a switching arm's teacher) without filling the disk."""
    if iterations < 2 or iterations % 2:
        raise AblationError(f"a schedule of {iterations} iterations has no integer half")
    half = iterations // 2
    return max(d for d in range(1, min(half, MAX_CHECKPOINT_PERIOD) + 1) if half % d == 0)


def lr_steps(iterations: int) -> Tuple[int, int]:
    """``SOLVER.STEPS`` at 80 % and 95 % of ``iterations``, rounded down.

    Raises:
        AblationError: the two steps do not rise strictly inside (0, iterations), which
            Detectron2's scheduler refuses (fewer than 8 iterations).
    """
    # Integer arithmetic: 0.95 * 1200 is not exactly 1140 in floating point.
    first, second = 4 * iterations // 5, 19 * iterations // 20
    if not 0 < first < second < iterations:
        raise AblationError(
            f"{iterations} iterations are too few for SOLVER.STEPS ({first}, {second}): "
            "use a schedule of at least 8 iterations (16 for a switching arm)"
        )
    return first, second


def _rule_schedule(name: str, iterations: int, eval_period: int) -> Schedule:
    """The ``iters{S}`` rule applied to ``iterations``, evaluating every ``eval_period``."""
    return Schedule(name, iterations, lr_steps(iterations), eval_period, checkpoint_period(iterations))


def parse_schedule(name: str) -> Schedule:
    """The schedule called ``name``: ``curve`` or ``iters{S}`` with S a positive multiple of 8."""
    if name == CURVE:
        return Schedule(CURVE, 2400, (1920, 2280), 300, 300)
    match = re.fullmatch(r"iters(\d+)", name)
    if not match:
        raise AblationError(f"unknown schedule {name!r}: use 'curve' or 'iters<S>' (e.g. iters600)")
    iterations = int(match.group(1))
    if iterations == 0 or iterations % 8:
        raise AblationError(f"schedule {name!r}: S={iterations} must be a positive multiple of 8")
    return _rule_schedule(name, iterations, eval_period=iterations // 4)


def half_schedule(schedule: Schedule) -> Schedule:
    """What a switching arm trains on its own: S/2 iterations by the ``iters`` rule, evaluated
    every S/8, so that its evaluations fall where its twin's do once offset by S/2."""
    return _rule_schedule(schedule.name, schedule.max_iter // 2, eval_period=schedule.max_iter // 8)


def schedule_overrides(schedule: Schedule, seed: int) -> List[str]:
    """The yacs overrides of ``schedule`` for ``seed``, in train_net's ``KEY VALUE`` form."""
    return [
        "SOLVER.MAX_ITER", str(schedule.max_iter),
        "SOLVER.STEPS", f"({schedule.steps[0]}, {schedule.steps[1]})",
        "TEST.EVAL_PERIOD", str(schedule.eval_period),
        "SOLVER.CHECKPOINT_PERIOD", str(schedule.checkpoint_period),
        "SEED", str(seed),
    ]


def checkpoint_name(iterations_done: int) -> str:
    """Detectron2's periodic checkpoint after ``iterations_done`` iterations (0-based in the name)."""
    return f"model_{iterations_done - 1:07d}.pth"


def run_dir(work_dir, schedule: str, arm: str, seed: int) -> Path:
    """A run's training folder (``OUTPUT_DIR``)."""
    return Path(work_dir) / schedule / f"{arm}-seed{seed}"


def result_path(results_dir, schedule: str, arm: str, seed: int) -> Path:
    """A run's result file."""
    return Path(results_dir) / schedule / f"{arm}-seed{seed}.json"


def plan_run(
    arms: Dict[str, Arm],
    arm_name: str,
    schedule: Schedule,
    seed: int,
    work_dir,
    results_dir,
    extra_opts: Sequence[str] = (),
) -> RunPlan:
    """The plan of one run: its folders, its overrides (arm's, schedule's, teacher's, then
    ``extra_opts``) and its iteration counts.

    Raises:
        AblationError: ``arm_name`` (or the arm it switches from) is not in ``arms``.
    """
    if arm_name not in arms:
        raise AblationError(f"unknown arm {arm_name!r}; known arms: {', '.join(arms)}")
    arm = arms[arm_name]
    output_dir = run_dir(work_dir, schedule.name, arm_name, seed)
    own, teacher = schedule, None
    if arm.switch_from is not None:
        if arm.switch_from not in arms:
            raise AblationError(f"arm {arm_name!r} switches from unknown arm {arm.switch_from!r}")
        own = half_schedule(schedule)
        teacher = run_dir(work_dir, schedule.name, arm.switch_from, seed) / checkpoint_name(own.max_iter)
    overrides = ["OUTPUT_DIR", str(output_dir), *arm.overrides, *schedule_overrides(own, seed)]
    if teacher is not None:
        overrides += ["MODEL.WEIGHTS", str(teacher)]
    overrides += list(extra_opts)
    is_teacher = any(other.switch_from == arm_name for other in arms.values())
    return RunPlan(
        schedule=schedule.name,
        arm=arm_name,
        description=arm.description,
        seed=seed,
        output_dir=output_dir,
        result_file=result_path(results_dir, schedule.name, arm_name, seed),
        overrides=overrides,
        extra_opts=list(extra_opts),
        own_iterations=own.max_iter,
        total_iterations=schedule.max_iter,
        teacher_checkpoint=teacher,
        keep_checkpoint=checkpoint_name(schedule.max_iter // 2) if is_teacher else None,
    )


def check_teacher(plan: RunPlan, teacher_command: str) -> None:
    """Raise :class:`AblationError` naming the missing checkpoint of a switching arm's teacher and
    ``teacher_command``, the command that trains it."""
    if plan.teacher_checkpoint is not None and not plan.teacher_checkpoint.is_file():
        raise AblationError(
            f"arm {plan.arm!r} (seed {plan.seed}) starts from {plan.teacher_checkpoint}, which does "
            f"not exist; train its teacher first: {teacher_command}"
        )


def run_finished(plan: RunPlan) -> bool:
    """Whether the run trained to the end and was evaluated there (e.g. a run started by hand)."""
    switch_file = plan.output_dir / SWITCH_FILE
    if not (plan.output_dir / "model_final.pth").is_file() or not switch_file.is_file():
        return False
    records = json.loads(switch_file.read_text())
    return bool(records) and records[-1]["iteration"] >= plan.own_iterations


def run_decision(plan: RunPlan) -> str:
    """What to do with a run: ``"skip"`` (its result is stored), ``"collect"`` (it finished
    without the runner: only store its result), ``"resume"`` (a killed run left a
    ``last_checkpoint``) or ``"start"``."""
    if plan.result_file.is_file():
        return "skip"
    if run_finished(plan):
        return "collect"
    if (plan.output_dir / "last_checkpoint").is_file():
        return "resume"
    return "start"


# A list that json.dumps(indent=1) spread over lines and that holds no list, object or string: a
# list of numbers (or nulls). It starts with a newline, which no JSON string holds unescaped.
_SPREAD_SCALAR_LIST = re.compile(r'\[(\n[^\[\]{}"]*)\]')


def write_json_atomic(path, data) -> None:
    """Write ``data`` as indented JSON to ``path``, each list of numbers on one line (a branch
    trajectory stays a few hundred lines), through a temporary file, so a kill leaves the old file
    or the new one, never half of one."""
    text = _SPREAD_SCALAR_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(data, indent=1))
    write_text_atomic(path, text + "\n")


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, so a kill leaves the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8"))  # bytes: no newline translation, "\r\n" kept as it is
    os.replace(tmp, path)


def load_run_time(output_dir) -> Dict:
    """The run's timed segments ``{"segments": [{"commit", "seconds", "threads"}, ...],
    "untimed_prior_run"}`` (segments timed before threads were recorded lack ``threads``).

    Without a ``runner_time.json``, a folder that already holds training output was trained
    outside the runner (started by hand): that time is unknown, so ``untimed_prior_run`` is True.
    """
    output_dir = Path(output_dir)
    path = output_dir / RUN_TIME_FILE
    if path.is_file():
        return json.loads(path.read_text())
    prior = any((output_dir / name).exists() for name in ("last_checkpoint", "metrics.json"))
    return {"segments": [], "untimed_prior_run": prior}


def prune_checkpoints(output_dir, keep: Optional[str]) -> List[str]:
    """Delete the intermediate checkpoints ``model_0*.pth`` of a finished run except ``keep``
    (``model_final.pth`` is never matched); return the names deleted."""
    deleted = []
    for path in sorted(Path(output_dir).glob("model_0*.pth")):
        if path.name != keep:
            path.unlink()
            deleted.append(path.name)
    return deleted


def reduce_evaluations(records: Iterable[Dict]) -> List[Dict]:
    """``branch_switch.json``'s records reduced to ``{iteration, branch_off: {AP, AP50},
    branch_on: {AP, AP50}}`` (``branch_on`` only for a model with a softmax branch), sorted by
    iteration; a resumed run evaluates some iterations again and its last record wins."""
    by_iteration = {}
    for record in records:
        reduced = {"iteration": record["iteration"]}
        for state in ("branch_off", "branch_on"):
            if state in record:
                bbox = record[state]["bbox"]
                reduced[state] = {"AP": bbox["AP"], "AP50": bbox["AP50"]}
        by_iteration[record["iteration"]] = reduced
    return [by_iteration[i] for i in sorted(by_iteration)]


def build_result(
    plan: RunPlan,
    evaluations: List[Dict],
    vit_gmacs: float,
    run_time: Dict,
    branch_stats: Dict,
    branch_trajectory: Optional[Dict],
    machine: Dict,
) -> Dict:
    """The result file of a finished run (see castling_det.commands.benchmark_accuracy for the
    fields; ``branch_stats`` and ``branch_trajectory`` as castling_det.analysis.branch_stats
    computes them).

    Raises:
        AblationError: the run has no evaluation (``branch_switch.json`` empty).
    """
    if not evaluations:
        raise AblationError(f"{plan.output_dir / SWITCH_FILE} holds no evaluation")
    commits = list(dict.fromkeys(segment["commit"] for segment in run_time["segments"]))
    return {
        "arm": plan.arm,
        "description": plan.description,
        "schedule": plan.schedule,
        "seed": plan.seed,
        "overrides": list(plan.overrides),
        "extra_opts": list(plan.extra_opts),
        "total_iterations": plan.total_iterations,
        "own_iterations": plan.own_iterations,
        "teacher_checkpoint": str(plan.teacher_checkpoint) if plan.teacher_checkpoint else None,
        "evaluations": evaluations,
        "final": evaluations[-1],
        "vit_gmacs_640x480": vit_gmacs,
        "wall_seconds": sum(segment["seconds"] for segment in run_time["segments"]),
        "segments": len(run_time["segments"]),
        # None: a segment timed before the runner recorded its thread count (it used all CPUs).
        "segment_threads": [segment.get("threads") for segment in run_time["segments"]],
        "untimed_prior_run": run_time["untimed_prior_run"],
        "branch_first_half": branch_stats,
        "branch_trajectory": branch_trajectory,
        "machine": machine,
        "commit": ", ".join(commits) if commits else "unknown (not run by the runner)",
    }


def load_results(results_dir) -> List[Dict]:
    """Every result file under ``results_dir`` (``{schedule}/{arm}-seed{seed}.json``)."""
    return [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*/*.json"))]


def _schedule_key(name: str):
    """Sort key of schedules: the curve first, then by length (iters600 before iters1200)."""
    match = re.fullmatch(r"iters(\d+)", name)
    return (name != CURVE, int(match.group(1)) if match else 0, name)


def group_results(
    results: Iterable[Dict], arm_order: Sequence[str] = ()
) -> Dict[str, Dict[str, List[Dict]]]:
    """``{schedule: {arm: [results by seed]}}``: schedules curve first then by length, arms in
    ``arm_order`` (others after it, by name)."""
    rank = {arm: index for index, arm in enumerate(arm_order)}
    grouped: Dict[str, Dict[str, List[Dict]]] = {}
    ordered = sorted(
        results,
        key=lambda r: (_schedule_key(r["schedule"]), rank.get(r["arm"], len(rank)), r["arm"], r["seed"]),
    )
    for result in ordered:
        grouped.setdefault(result["schedule"], {}).setdefault(result["arm"], []).append(result)
    return grouped


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values: Sequence[float], std_of_one: str = " ± —") -> str:
    """``"mean ± std [v1, v2, ...]"`` to one decimal; a single value has ``std_of_one`` in place
    of `` ± std`` (e.g. "" for ``"mean [v1]"``)."""
    mean, std = mean_std(values)
    spread = std_of_one if std is None else f" ± {std:.1f}"
    return f"{mean:.1f}{spread} [{', '.join(f'{v:.1f}' for v in values)}]"


def branch_gap_mean(results: Sequence[Dict]) -> Optional[float]:
    """Mean final box AP gap, branch on minus off, over the runs trained with a softmax branch
    and evaluated both ways; None if none was (a run trained without a branch may still be
    evaluated both ways, but it has no branch to switch off)."""
    gaps = [
        result["final"]["branch_on"]["AP"] - result["final"]["branch_off"]["AP"]
        for result in results if has_branch(result) and "branch_on" in result["final"]
    ]
    return statistics.mean(gaps) if gaps else None


def summarize_arm(results: Sequence[Dict]) -> Dict:
    """The aggregates of one arm's runs (one per seed) in one schedule, from their final evaluation.

    Returns:
        ``arm``, ``description``, ``seeds``, ``ap`` (branch-off box AP per seed), ``ap_mean``,
        ``ap_std`` (None for one seed), ``ap50_mean``, ``gap_mean`` (see :func:`branch_gap_mean`),
        ``gmacs``, ``kept_blocks`` (``"k/num"`` per seed, None without branch statistics), ``total_iterations``, ``minutes`` (mean wall time of the
        fully timed runs; None if none), ``untimed``, ``switched`` and ``fewer_threads`` (part of
        a run trained with fewer threads than CPUs) flags.
    """
    finals = [result["final"] for result in results]
    ap = [final["branch_off"]["AP"] for final in finals]
    ap_mean, ap_std = mean_std(ap)
    timed = [result["wall_seconds"] for result in results if not result["untimed_prior_run"]]
    kept = []
    for result in results:
        stats = result["branch_first_half"]
        if stats["num_blocks"] is not None:
            kept.append(f"{stats['blocks_kept_mass_above_5pct']}/{stats['num_blocks']}")
    return {
        "arm": results[0]["arm"],
        "description": results[0]["description"],
        "seeds": [result["seed"] for result in results],
        "ap": ap,
        "ap_mean": ap_mean,
        "ap_std": ap_std,
        "ap50_mean": statistics.mean(final["branch_off"]["AP50"] for final in finals),
        "gap_mean": branch_gap_mean(results),
        "gmacs": statistics.mean(result["vit_gmacs_640x480"] for result in results),
        "kept_blocks": kept or None,
        "total_iterations": sorted({result["total_iterations"] for result in results}),
        "minutes": statistics.mean(timed) / 60 if timed else None,
        "untimed": len(timed) < len(results),
        "fewer_threads": any(
            threads is not None and threads < result["machine"]["cpus"]
            for result in results for threads in result.get("segment_threads", ())
        ),
        "switched": any(result["total_iterations"] != result["own_iterations"] for result in results),
    }


def curve_points(result: Dict) -> Tuple[List[int], List[float]]:
    """A run's learning curve: total iterations (a switching arm's teacher included) and the
    branch-off box AP of each evaluation."""
    offset = result["total_iterations"] - result["own_iterations"]
    evaluations = result["evaluations"]
    return [e["iteration"] + offset for e in evaluations], [e["branch_off"]["AP"] for e in evaluations]


def _describe_machine(machine: Dict) -> str:
    """One line for a result's ``machine`` field."""
    flags = ", ".join(f"{flag} {'yes' if machine.get(flag) else 'no'}" for flag in ("avx512f", "amx_tile"))
    return f"{machine.get('model_name', 'unknown CPU')}, {machine.get('cpus')} CPUs ({flags})"


def _provenance(results: Iterable[Dict]) -> List[str]:
    """The lines naming the machines and commits that produced ``results``, and the overrides
    added on the command line (which may change the schedule stated above the table)."""
    results = list(results)
    machines = dict.fromkeys(_describe_machine(result["machine"]) for result in results)
    commits = dict.fromkeys(result["commit"] for result in results)
    lines = [f"Machine(s): {'; '.join(machines)}.", f"Commit(s): {'; '.join(commits)}."]
    extras = dict.fromkeys(" ".join(result["extra_opts"]) for result in results if result["extra_opts"])
    if extras:
        lines.append("Extra overrides: " + "; ".join(f"`{extra}`" for extra in extras) + ".")
    return lines


def _curve_table(by_arm: Dict[str, List[Dict]]) -> List[str]:
    """Markdown lines: branch-off box AP at each evaluated iteration, one row per arm and seed."""
    points = {(r["arm"], r["seed"]): dict(zip(*curve_points(r))) for runs in by_arm.values() for r in runs}
    iterations = sorted({i for curve in points.values() for i in curve})
    lines = [
        "| arm | seed | " + " | ".join(f"AP @ {i}" for i in iterations) + " |",
        "|---|---|" + "---|" * len(iterations),
    ]
    for (arm, seed), curve in points.items():
        cells = [f"{curve[i]:.1f}" if i in curve else "—" for i in iterations]
        lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    return lines


def _ablation_table(by_arm: Dict[str, List[Dict]]) -> List[str]:
    """Markdown lines: one row per arm, seeds aggregated (see :func:`summarize_arm`)."""
    summaries = [summarize_arm(runs) for runs in by_arm.values()]
    window = next((s["gmacs"] for s in summaries if s["arm"] == "window"), None)
    lines = [
        "| arm | description | seeds (n) | box AP, branch off | AP50 | AP gap, on − off "
        "| ViT GMACs 640×480 | ÷ window | blocks kept mass > 5 % (1st half) | total iterations "
        "| min per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        gap = "—" if s["gap_mean"] is None else f"{s['gap_mean']:+.1f}"
        ratio = "—" if window is None else f"{s['gmacs'] / window:.2f}"
        kept = "—" if s["kept_blocks"] is None else ", ".join(s["kept_blocks"])
        minutes = "—" if s["minutes"] is None else f"{s['minutes']:.1f}"
        lines.append(
            f"| {s['arm']}{' †' if s['switched'] else ''} | {s['description']} "
            f"| {', '.join(map(str, s['seeds']))} ({len(s['seeds'])}) | {format_mean_std(s['ap'])} "
            f"| {s['ap50_mean']:.1f} | {gap} | {s['gmacs']:.2f} | {ratio} | {kept} "
            f"| {', '.join(map(str, s['total_iterations']))} "
            f"| {minutes}{' *' if s['untimed'] else ''}{' ‡' if s['fewer_threads'] else ''} |"
        )
    return lines


_NOTES = (
    "Box AP and AP50 are the final evaluation's, softmax branch off (as deployed); std is the "
    "sample std over seeds (— for one seed). GMACs are fvcore multiply-adds of the ViT alone on one "
    "640×480 image, branch off. † trained from its teacher's checkpoint at half the schedule: "
    "total iterations include the teacher's, minutes do not. * part of the run was trained outside "
    "the runner and is not timed: the minutes average only fully timed runs. ‡ trained (in part) "
    "with fewer threads than CPUs, e.g. two 1-thread runs side by side on 2 CPUs: its minutes "
    "are those of a shared machine, longer than a run's alone."
)


def final_ap_by_arm(by_arm: Dict[str, List[Dict]]) -> Dict[str, List[float]]:
    """Each arm's final box AP with the branch off, one value per seed, in ``by_arm``'s order."""
    return {arm: [result["final"]["branch_off"]["AP"] for result in runs] for arm, runs in by_arm.items()}


def results_markdown(
    results: Iterable[Dict], arm_order: Sequence[str] = (), references: Sequence[str] = ()
) -> str:
    """The report: per schedule, the ablation table of the final evaluations (for ``curve``
    after the learning-curve table), the differences to the ``references`` arms against the
    seed noise, and the machines and commits that produced it; then the softmax branch's table."""
    lines = ["# BCCD accuracy ablation (Faster R-CNN, Castling-ViT-Ti)", ""]
    grouped = group_results(results, arm_order)
    for name, by_arm in grouped.items():
        schedule = parse_schedule(name)
        lines += [
            f"## {name}",
            "",
            f"SOLVER.MAX_ITER {schedule.max_iter}, SOLVER.STEPS {schedule.steps}, "
            f"TEST.EVAL_PERIOD {schedule.eval_period}."
            + (" Box AP, branch off, at each evaluation (total iterations)." if name == CURVE else ""),
            "",
        ]
        if name == CURVE:
            # The curve schedule is also the ablation's converged one: its last evaluations
            # make a table of their own beside the curves.
            lines += _curve_table(by_arm) + ["", f"At iteration {schedule.max_iter}:", ""]
        lines += _ablation_table(by_arm)
        differences = difference_markdown(final_ap_by_arm(by_arm), references)
        lines += ["", *differences, *([""] if differences else [])]
        lines += [*_provenance(r for runs in by_arm.values() for r in runs), ""]
    lines += [_NOTES, "", *branch_markdown(grouped), ""]
    return "\n".join(lines)
