"""The softmax branch's statistics of one run, read from its ``metrics.json``, where
castling_det.engine.BranchRegularizer logs per castling block ``branch/mass/block{i}`` (the softmax
mass per query that the branch's mask keeps) and ``branch/share/block{i}`` (the branch's share of
the attention sum, by norm), and every step ``branch/scale`` and ``branch/l1_weight``.

Two summaries go into a result file of the BCCD ablation: the medians over the first half of
training (``branch_first_half``) and the downsampled trajectory (``branch_trajectory``); the
report's branch table is made from them.
"""
import math
import re
import statistics
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

from .metrics_log import read_metrics

__all__ = [
    "KEPT_MASS_LIMIT",
    "MAX_TRAJECTORY_POINTS",
    "block_medians",
    "branch_markdown",
    "branch_trajectory",
    "downsample_indices",
    "first_half_branch_stats",
    "has_branch",
    "retired_at",
]

# A block "keeps" its softmax branch when more than this much mass survives the mask.
KEPT_MASS_LIMIT = 0.05
MAX_TRAJECTORY_POINTS = 100
_BLOCK_KEY = re.compile(r"branch/(mass|share)/block(\d+)")
# Four significant digits: the plot needs no more, and the result file stays small.
_DIGITS = 4


def _finite(value) -> Optional[float]:
    """``value`` as a float when it is a finite number, else None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def first_half_branch_stats(metrics_file, own_iterations: int) -> Dict:
    """Per castling block, the median kept mass and median branch share over the ``metrics.json``
    records of the first half of training (iteration < own_iterations / 2), and how many blocks
    keep more than 5 % of the mass.

    Returns:
        ``{"records": n, "blocks": {"block3": {"kept_mass": m, "share": s}, ...},
        "blocks_kept_mass_above_5pct": k, "num_blocks": b}``; the last three are None when no
        record of the first half has branch statistics (no castling block, or a run too short).
    """
    values = defaultdict(lambda: defaultdict(list))  # block -> "mass"/"share" -> values
    records = 0
    for record in read_metrics(str(metrics_file)):
        if record["iteration"] >= own_iterations / 2:
            continue
        found = False
        for key, value in record.items():
            match = _BLOCK_KEY.fullmatch(key)
            if match and _finite(value) is not None:
                values[int(match.group(2))][match.group(1)].append(float(value))
                found = True
        records += found
    if not values:
        return {"records": 0, "blocks": None, "blocks_kept_mass_above_5pct": None, "num_blocks": None}
    blocks = {
        f"block{index}": {
            "kept_mass": statistics.median(values[index]["mass"]) if values[index]["mass"] else None,
            "share": statistics.median(values[index]["share"]) if values[index]["share"] else None,
        }
        for index in sorted(values)
    }
    above = sum(1 for stats in blocks.values() if (stats["kept_mass"] or 0.0) > KEPT_MASS_LIMIT)
    return {
        "records": records, "blocks": blocks, "blocks_kept_mass_above_5pct": above, "num_blocks": len(blocks)
    }


def downsample_indices(count: int, max_points: int) -> List[int]:
    """At most ``max_points`` (at least 2) indices into a sequence of ``count`` items, evenly
    spread, the first and the last included."""
    if count <= max_points:
        return list(range(count))
    # The step (count - 1) / (max_points - 1) exceeds 1, so no two indices round alike.
    return [round(i * (count - 1) / (max_points - 1)) for i in range(max_points)]


def branch_trajectory(metrics_file, max_points: int = MAX_TRAJECTORY_POINTS) -> Optional[Dict]:
    """The branch's statistics over training, from ``metrics_file``, downsampled to at most
    ``max_points`` logged iterations (the first and last kept), values to 4 significant digits.

    Returns:
        None when no record holds a block statistic (no softmax branch), else::

            {"records": n,                  # records with branch statistics, before downsampling
             "iterations": [i0, i1, ...],
             "scale": [s0, s1, ...],        # branch/scale; None when not logged
             "l1_weight": [w0, w1, ...],    # branch/l1_weight; None when not logged
             "kept_mass": {"block0": [m0, m1, ...], ...},
             "share": {"block0": [h0, h1, ...], ...}}

        Every list is aligned with ``iterations``; null where that record lacks the value (a block
        is not measured once the scale has reached 0, since the branch is not computed then).
    """
    records = read_metrics(str(metrics_file))
    blocks = sorted({int(m.group(2)) for r in records for m in map(_BLOCK_KEY.fullmatch, r) if m})
    if not blocks:
        return None
    series = {
        "scale": "branch/scale",
        "l1_weight": "branch/l1_weight",
        **{f"mass/block{b}": f"branch/mass/block{b}" for b in blocks},
        **{f"share/block{b}": f"branch/share/block{b}" for b in blocks},
    }
    logged = [r for r in records if any(key in r for key in series.values())]
    kept = [logged[i] for i in downsample_indices(len(logged), max_points)]
    columns = {}
    for name, key in series.items():
        values = [_finite(record.get(key)) for record in kept]
        columns[name] = [None if v is None else float(f"{v:.{_DIGITS}g}") for v in values]
    return {
        "records": len(logged),
        "iterations": [record["iteration"] for record in kept],
        "scale": columns["scale"] if any(v is not None for v in columns["scale"]) else None,
        "l1_weight": columns["l1_weight"] if any(v is not None for v in columns["l1_weight"]) else None,
        "kept_mass": {f"block{b}": columns[f"mass/block{b}"] for b in blocks},
        "share": {f"block{b}": columns[f"share/block{b}"] for b in blocks},
    }


def has_branch(result: Dict) -> bool:
    """Whether the run of ``result`` trained with a softmax branch in any block."""
    if "branch_trajectory" in result:
        return result["branch_trajectory"] is not None
    # A result recorded before trajectories were stored.
    return result["branch_first_half"]["num_blocks"] is not None


def retired_at(trajectory: Dict) -> Optional[int]:
    """The first logged iteration at which the branch scale is 0 (the branch is not computed from
    then on), or None if it never is or the scale was not logged."""
    scales = trajectory["scale"] or []
    return next((i for i, s in zip(trajectory["iterations"], scales) if s == 0.0), None)


def _median_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def block_medians(series: Dict[str, List[Optional[float]]]) -> List[Optional[float]]:
    """The median over blocks at each point of a trajectory's ``kept_mass`` or ``share``
    (None where no block was measured)."""
    return [_median_or_none(values) for values in zip(*series.values())]


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2g} %"


def _last_share(trajectory: Dict) -> str:
    """The median share over blocks at the last logged iteration that measured one (none is
    measured once the scale is 0), and that iteration."""
    medians = zip(trajectory["iterations"], block_medians(trajectory["share"]))
    measured = [(iteration, median) for iteration, median in medians if median is not None]
    if not measured:
        return "—"
    iteration, share = measured[-1]
    return f"{_percent(share)} @ {iteration}"


def _run_cells(result: Dict) -> List[str]:
    """The branch table's cells of one run with a branch: blocks above 5 % kept mass in the first
    half, median share in the first half and at the end, and the iteration from which the branch
    scale is 0."""
    first_half = result["branch_first_half"]
    kept = "—" if first_half["num_blocks"] is None else \
        f"{first_half['blocks_kept_mass_above_5pct']}/{first_half['num_blocks']}"
    first_share = _median_or_none(stats["share"] for stats in (first_half["blocks"] or {}).values())
    trajectory = result.get("branch_trajectory")
    if trajectory is None:  # recorded before trajectories were stored
        return [kept, _percent(first_share), "not recorded", "not recorded"]
    retired = retired_at(trajectory)
    return [kept, _percent(first_share), _last_share(trajectory), "never" if retired is None else str(retired)]


def branch_markdown(grouped: Dict[str, Dict[str, List[Dict]]]) -> List[str]:
    """Markdown lines of the branch table: one row per schedule and arm of ``grouped``
    (``{schedule: {arm: [results by seed]}}``), one value per seed in each cell, ``no branch``
    for an arm without a softmax branch."""
    lines = [
        "## Softmax branch",
        "",
        "Per castling block, from metrics.json (figure: branch.png): kept mass, the softmax mass per "
        "query that the branch's mask keeps; share, the branch's share of the attention sum (by "
        "norm). First half: iterations below half of the run's own schedule. At end: the last "
        "logged iteration the branch was measured at. Retired: the first logged iteration with "
        "branch scale 0, from which the branch is not computed. One value per seed.",
        "",
        "| schedule | arm | seeds | blocks with kept mass > 5 %, 1st half | median share, 1st half "
        "| median share at end | retired at iteration |",
        "|---|---|---|---|---|---|---|",
    ]
    for schedule, by_arm in grouped.items():
        for arm, runs in by_arm.items():
            seeds = ", ".join(str(result["seed"]) for result in runs)
            if not any(has_branch(result) for result in runs):
                lines.append(f"| {schedule} | {arm} | {seeds} | no branch | — | — | — |")
                continue
            cells = [_run_cells(result) if has_branch(result) else ["no branch"] * 4 for result in runs]
            columns = (", ".join(column) for column in zip(*cells))
            lines.append(f"| {schedule} | {arm} | {seeds} | " + " | ".join(columns) + " |")
    return lines
