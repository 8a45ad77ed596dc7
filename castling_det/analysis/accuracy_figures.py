"""The BCCD ablation report's figures, from its result files: ``accuracy.png`` (learning curves;
final box AP per arm, with its ViT GMACs) and ``branch.png`` (the softmax branch's kept mass and share per block
over training)."""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .accuracy_runs import CURVE, curve_points, group_results, summarize_arm  # noqa: E402
from .branch_stats import KEPT_MASS_LIMIT, block_medians, has_branch, retired_at  # noqa: E402

__all__ = ["plot_accuracy", "plot_branch"]

# Below this the branch statistics' axes are linear, above logarithmic: kept masses and shares
# span decades down to 1e-7, while 0 (an empty mask) must stay on the axes.
_LINEAR_BELOW = 1e-6


def _finish(ax, empty_text: str) -> None:
    """Grid and legend, or ``empty_text`` in the middle of an axes with nothing drawn."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)


def plot_accuracy(results: List[Dict], arm_order: Sequence[str], path) -> List[Dict]:
    """Write ``path``: left, the ``curve`` schedule's learning curves (a colour per arm, a line
    style per seed); right, for every schedule, each arm's box AP at its final evaluation (mean ±
    std over seeds, every seed's value as a dot), a row per arm labelled with its ViT GMACs, arms in
    ``arm_order``.

    Returns:
        The rows of the right panel, top first: ``schedule``, ``arm``, ``gmacs``, ``ap`` (per
        seed), ``ap_mean``, ``ap_std``.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    grouped = group_results(results, arm_order)
    curve_arms = grouped.get(CURVE, {})
    # tab10 repeats its colours after ten arms; tab20 keeps up to twenty apart.
    colours = plt.get_cmap("tab10" if len(curve_arms) <= 10 else "tab20").colors
    for index, (arm, runs) in enumerate(curve_arms.items()):
        for seed_index, result in enumerate(runs):
            label = f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if seed_index == 0 else None
            left.plot(*curve_points(result), marker="o", markersize=3, color=colours[index % len(colours)],
                      linestyle=("-", "--", ":", "-.")[seed_index % 4], label=label)
    left.set(
        xlabel="iteration (teacher's included)", ylabel="BCCD val box AP, branch off",
        title="learning curves (curve schedule; line style: seed)",
    )
    # Right: one row per arm, top to bottom in arm_order; many arms share a GMAC count, so the
    # cost goes into the row's label rather than on an axis.
    points = [
        {"schedule": name, **{key: summary[key] for key in ("arm", "gmacs", "ap", "ap_mean", "ap_std")}}
        for name, by_arm in grouped.items()
        for summary in (summarize_arm(runs) for runs in by_arm.values())
    ]
    rows = list(range(len(points)))[::-1]
    several_schedules = len(grouped) > 1
    for row, point in zip(rows, points):
        right.scatter(point["ap"], [row] * len(point["ap"]), s=14, color="gray", alpha=0.5,
                      label="a seed" if row == rows[0] else None)
        right.errorbar(point["ap_mean"], row, xerr=point["ap_std"] or 0.0, fmt="o", color="black",
                       capsize=3, label="mean ± std" if row == rows[0] else None)
    right.set_yticks(rows, [
        (f"{point['schedule']}: " if several_schedules else "") + f"{point['arm']} ({point['gmacs']:.2f} GMACs)"
        for point in points
    ], fontsize=7)
    right.set(xlabel="BCCD val box AP at the final evaluation, branch off",
              title="final box AP per arm (ViT GMACs at 640×480)")
    for ax in (left, right):
        _finish(ax, "no runs yet")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points


def _nan_for_none(values: List[Optional[float]]) -> List[float]:
    return [math.nan if v is None else v for v in values]


def _draw_statistic(ax, result: Dict, name: str, title: str) -> None:
    """One run's trajectory of ``name`` (``kept_mass`` or ``share``): a thin line per block, the
    median over blocks bold, and where the first half ends and the branch is retired."""
    trajectory = result["branch_trajectory"]
    iterations = trajectory["iterations"]
    for index, values in enumerate(trajectory[name].values()):
        ax.plot(iterations, _nan_for_none(values), color="tab:blue", linewidth=0.7, alpha=0.45,
                label="per block" if index == 0 else None)
    medians = _nan_for_none(block_medians(trajectory[name]))
    ax.plot(iterations, medians, color="black", linewidth=2.2, label="median over blocks")
    if name == "kept_mass":
        ax.axhline(KEPT_MASS_LIMIT, color="tab:red", linestyle="--", linewidth=1, label="5 %")
    ax.axvline(result["own_iterations"] / 2, color="gray", linestyle=":", label="first half ends")
    retired = retired_at(trajectory)
    if retired is not None:
        ax.axvline(retired, color="tab:orange", linestyle="-.", label="branch scale 0 (retired)")
    ax.set_yscale("symlog", linthresh=_LINEAR_BELOW)
    ax.set_ylim(0, 1)  # both are fractions: the whole range, so that runs compare at a glance
    ax.set_xlim(0, result["own_iterations"])
    ax.set(
        xlabel="iteration (the run's own)",
        title=f"{result['schedule']} {result['arm']} seed {result['seed']}: {title}",
    )


def plot_branch(results: List[Dict], arm_order: Sequence[str], path) -> List[str]:
    """Write ``path``: for each arm with a softmax branch, its lowest seed with a stored trajectory
    (arms in ``arm_order``), its kept mass and its share of the attention sum per block against the
    iteration; a note alone when no run has one.

    Returns:
        The runs drawn, ``"{schedule} {arm} seed {seed}"`` each.
    """
    grouped = group_results(results, arm_order)
    # One run per arm (its lowest seed): the seeds' trajectories look alike, and a row per run
    # would grow the figure past a size worth keeping in the repository.
    runs = []
    for by_arm in grouped.values():
        for arm_runs in by_arm.values():
            runs.extend([r for r in arm_runs if has_branch(r) and r.get("branch_trajectory")][:1])
    fig, axes = plt.subplots(max(len(runs), 1), 2, figsize=(13, 3.6 * max(len(runs), 1)), squeeze=False)
    for (mass_ax, share_ax), result in zip(axes, runs):
        _draw_statistic(mass_ax, result, "kept_mass", "kept softmax mass per query")
        _draw_statistic(share_ax, result, "share", "branch share of the attention sum")
    for ax in axes.flat:
        _finish(ax, "no run with a softmax branch (and a stored trajectory) yet")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=72)
    plt.close(fig)
    return [f"{r['schedule']} {r['arm']} seed {r['seed']}" for r in runs]
