"""Training curves of one or more runs from their ``metrics.json``: losses, AP, and the softmax
branch's schedule and statistics against the iteration, one line per run."""
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .metrics_log import block_summary, metric_series  # noqa: E402

__all__ = ["plot_training_curves"]

# Evaluation keys: SoftmaxBranchSwitch writes branch_on/bbox/AP, ...; Detectron2's EvalHook bbox/AP.
_AP_KEY = re.compile(r"^(?:branch_(on|off)/)?(bbox|segm|keypoints)/(AP|AP50)$")
# (line style, marker): the two states stay apart where their points coincide.
_STATE_STYLE = {"on": ("-", "o"), "off": ("--", "x"), None: ("-", "o")}


class Line(NamedTuple):
    label: str
    iterations: List[int]
    values: List[float]
    style: str = "-"
    marker: Optional[str] = None


def _loss_panels(runs: Dict[str, List[Dict]]) -> Dict[str, List[Line]]:
    keys = sorted({k for records in runs.values() for r in records for k in r if k.startswith("loss_")})
    panels = {}
    for key in ["total_loss", *keys]:
        panels[key] = [Line(run, *metric_series(records, key)) for run, records in runs.items()]
    return panels


def _ap_panels(runs: Dict[str, List[Dict]]) -> Dict[str, List[Line]]:
    panels: Dict[str, List[Line]] = {}
    for run, records in runs.items():
        # Reversed: branch_on before branch_off, whose crosses then stay visible on coinciding dots.
        keys = sorted({k for r in records for k in r if _AP_KEY.match(k)}, reverse=True)
        for key in keys:
            state, task, metric = _AP_KEY.match(key).groups()
            label = run if state is None else f"{run}, branch {state}"
            line = Line(label, *metric_series(records, key), *_STATE_STYLE[state])
            panels.setdefault(f"{task} {metric}", []).append(line)
    return panels


def _branch_panels(runs: Dict[str, List[Dict]]) -> Dict[str, List[Line]]:
    panels: Dict[str, List[Line]] = {}
    for key in ("branch/scale", "branch/l1_weight", "loss_branch_l1"):
        panels[key] = [Line(run, *metric_series(records, key)) for run, records in runs.items()]
    for prefix, title in (("branch/mass/", "kept softmax mass per query"),
                          ("branch/share/", "branch share of the attention sum")):
        lines = []
        for run, records in runs.items():
            iterations, mean, maximum = block_summary(records, prefix)
            lines += [Line(f"{run}, mean", iterations, mean), Line(f"{run}, max", iterations, maximum, "--")]
        panels[f"{title} (mean over blocks; max dashed)"] = lines
    return panels


def _draw(panels: Dict[str, List[Line]], path: Path, title: str, last_iteration: int) -> bool:
    """One axes per panel that has data, all over iterations 0 to ``last_iteration``; ``False``
    (and no file) when no panel has data."""
    panels = {name: [line for line in lines if line.values] for name, lines in panels.items()}
    panels = {name: lines for name, lines in panels.items() if lines}
    if not panels:
        return False
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for line in lines:
            ax.plot(line.iterations, line.values, line.style, marker=line.marker, markersize=5,
                    label=line.label)
        ax.set_xlim(0, last_iteration * 1.03)  # room for the markers at the last iteration
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_training_curves(runs: Dict[str, List[Dict]], output_dir) -> List[Path]:
    """Draw ``losses.png``, ``ap.png`` and ``branch.png`` in ``output_dir`` from ``runs`` (label ->
    records of :func:`read_metrics`); a figure with nothing to show is not written.

    Returns:
        The paths written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = (
        ("losses.png", _loss_panels, "training losses"),
        ("ap.png", _ap_panels, "evaluation AP (branch on solid, off dashed)"),
        ("branch.png", _branch_panels, "softmax branch: schedule, L1 loss, kept mass and share"),
    )
    last_iteration = max((r["iteration"] for records in runs.values() for r in records), default=0) or 1
    written = []
    for file_name, panels, title in figures:
        if _draw(panels(runs), output_dir / file_name, title, last_iteration):
            written.append(output_dir / file_name)
    return written
