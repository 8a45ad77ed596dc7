"""The BCCD accuracy ablation's tables as the README shows them, written between two marker lines.

The README keeps two tables of the ``curve`` schedule: box AP at every evaluation, one row per arm
and seed, and the final evaluation aggregated per arm (fewer columns than results.md's). They are
made from the stored results, like results.md, so the README cannot drift from them.
"""
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .accuracy_runs import (
    CURVE,
    AblationError,
    branch_gap_mean,
    curve_points,
    final_ap_by_arm,
    format_mean_std,
    group_results,
    parse_schedule,
    run_dir,
    summarize_arm,
)
from .seed_noise import difference_markdown

__all__ = ["BEGIN_MARKER", "END_MARKER", "readme_tables", "replace_marked_block"]

BEGIN_MARKER = "<!-- bccd-accuracy-tables:begin -->"
END_MARKER = "<!-- bccd-accuracy-tables:end -->"

_SUMMARY_INTRO = (
    "At {max_iter} iterations, per arm (box AP with the branch off, as deployed: mean ± sample std over the\n"
    "arm's seeds, every seed's value in brackets; the same table as `results.md`'s, fewer columns):"
)


def _signed(value: float) -> str:
    """``value`` to one decimal with its sign, a true minus sign (U+2212) for negatives."""
    return f"{value:+.1f}".replace("-", "−")


def _gap_cell(gap: Optional[float]) -> str:
    """A branch on − off gap (:func:`branch_gap_mean`) signed, or "—" without one."""
    return "—" if gap is None else _signed(gap)


def _labelled(arm: str, labels: Mapping[str, str]) -> str:
    """``arm``, followed by its README label in parentheses when it has one."""
    return f"{arm} ({labels[arm]})" if arm in labels else arm


def _teacher(result: Dict, results: Sequence[Dict]) -> Optional[Dict]:
    """The stored result of the run whose checkpoint a switching run started from (found by the
    run folder named in ``teacher_checkpoint``), or None (not switched, or not stored)."""
    if not result["teacher_checkpoint"]:
        return None
    folder = Path(*Path(result["teacher_checkpoint"]).parent.parts[-2:])  # {schedule}/{arm}-seed{s}
    return next((r for r in results if run_dir("", r["schedule"], r["arm"], r["seed"]) == folder), None)


def _curve_with_teacher(result: Dict, results: Sequence[Dict]) -> Dict[int, float]:
    """Box AP (branch off) by total iteration: a switching run's own evaluations after the switch,
    its teacher's (when stored) up to it."""
    curve = dict(zip(*curve_points(result)))
    teacher = _teacher(result, results)
    if teacher is not None:
        switch = result["total_iterations"] - result["own_iterations"]
        curve.update((i, ap) for i, ap in zip(*curve_points(teacher)) if i <= switch)
    return curve


def _curve_table(by_arm: Dict[str, List[Dict]], labels: Mapping[str, str]) -> List[str]:
    """Markdown lines: per arm and seed, box AP at each evaluation, final AP gap and ViT GMACs;
    the arm's label on its first row only."""
    runs = [r for arm_runs in by_arm.values() for r in arm_runs]
    curves = [_curve_with_teacher(r, runs) for r in runs]
    iterations = sorted({i for curve in curves for i in curve})
    # Only the first iteration column says "AP @": the table is wide enough as it is.
    columns = [f"AP @ {iterations[0]}", *map(str, iterations[1:])]
    lines = [
        "| arm (curve schedule) | seed | " + " | ".join(columns)
        + " | AP gap, branch on − off | ViT GMACs, 640×480 |",
        "|---|---|" + "---|" * len(iterations) + "---|---|",
    ]
    for index, (result, curve) in enumerate(zip(runs, curves)):
        first = index == 0 or runs[index - 1]["arm"] != result["arm"]
        name = _labelled(result["arm"], labels) if first else result["arm"]
        cells = [f"{curve[i]:.1f}" if i in curve else "—" for i in iterations]
        lines.append(
            f"| {name} | {result['seed']} | " + " | ".join(cells)
            + f" | {_gap_cell(branch_gap_mean([result]))} | {result['vit_gmacs_640x480']:.2f} |"
        )
    return lines


def _kept_cell(kept_blocks: Optional[List[str]]) -> str:
    """Blocks with kept mass above 5 % per seed ("12/12 in each" when every seed agrees), "—"
    without branch statistics."""
    if kept_blocks is None:
        return "—"
    if len(kept_blocks) > 1 and len(set(kept_blocks)) == 1:
        return f"{kept_blocks[0]} in each"
    return ", ".join(kept_blocks)


def _summary_table(by_arm: Dict[str, List[Dict]], labels: Mapping[str, str]) -> List[str]:
    """Markdown lines: one row per arm, its final evaluations aggregated over seeds."""
    summaries = {arm: summarize_arm(runs) for arm, runs in by_arm.items()}
    window = summaries["window"]["gmacs"] if "window" in summaries else None
    lines = [
        "| arm | seeds | box AP | AP gap, on − off | ViT GMACs, 640×480 | ÷ window "
        "| blocks kept mass > 5 %, 1st half |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summaries.items():
        ratio = "—" if window is None else f"{s['gmacs'] / window:.2f}"
        lines.append(
            f"| {_labelled(arm, labels)} | {', '.join(map(str, s['seeds']))} "
            f"| {format_mean_std(s['ap'], std_of_one='')} | {_gap_cell(s['gap_mean'])} | {s['gmacs']:.2f} "
            f"| {ratio} | {_kept_cell(s['kept_blocks'])} |"
        )
    return lines


def readme_tables(
    results: Sequence[Dict], arm_order: Sequence[str], labels: Mapping[str, str], references: Sequence[str] = ()
) -> str:
    """The README's block: the ``curve`` schedule's learning-curve table, one line of intro, its
    final-evaluation table and the differences to the ``references`` arms against the seed noise,
    arms in ``arm_order``, labelled by ``labels`` in the first two; a blank line before and after,
    for the marker lines around it.

    Raises:
        AblationError: no result of the ``curve`` schedule.
    """
    by_arm = group_results(results, arm_order).get(CURVE)
    if not by_arm:
        raise AblationError(f"no result of the {CURVE!r} schedule: the README's tables are made from it")
    intro = _SUMMARY_INTRO.format(max_iter=parse_schedule(CURVE).max_iter)
    lines = ["", *_curve_table(by_arm, labels), "", intro, "", *_summary_table(by_arm, labels), ""]
    differences = difference_markdown(final_ap_by_arm(by_arm), references)
    lines += [*differences, *([""] if differences else [])]
    return "\n".join(lines) + "\n"


def _marker_line(lines: List[str], marker: str, source: str) -> int:
    """The index of the one line of ``lines`` that is ``marker`` (surrounding blanks ignored).

    Raises:
        AblationError: ``marker`` is on no line, or on several.
    """
    found = [i for i, line in enumerate(lines) if line.strip() == marker]
    if len(found) != 1:
        where = "lacks the marker line" if not found else f"has {len(found)} marker lines"
        raise AblationError(f"{source} {where} {marker}: it needs exactly one, on a line of its own")
    return found[0]


def replace_marked_block(text: str, block: str, source: str) -> str:
    """``text`` with the lines between its BEGIN_MARKER and END_MARKER lines replaced by
    ``block``; the markers and everything outside them are kept byte for byte.

    Raises:
        AblationError: a marker is missing or repeated, or the end comes before the begin
            (``source`` names the file in the message).
    """
    lines = text.splitlines(keepends=True)
    begin = _marker_line(lines, BEGIN_MARKER, source)
    end = _marker_line(lines, END_MARKER, source)
    if end < begin:
        raise AblationError(f"{source} has the marker line {END_MARKER} before {BEGIN_MARKER}")
    return "".join(lines[: begin + 1]) + block + "".join(lines[end:])
