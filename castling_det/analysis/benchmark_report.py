"""The benchmark's files: a CSV per table, a Markdown summary of every table, a log-log plot of
the backbones, and the targets as a console table."""
import csv
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

__all__ = ["TABLES", "format_targets", "plot_backbones", "write_csv", "write_summary"]

# The tables of a benchmark run, in the order the summary shows them.
TABLES = ("targets", "backbone", "detector", "operator", "accuracy")


def write_csv(path: Path, rows: List[dict]) -> None:
    """``rows`` as a CSV with a column per key (in order of first appearance); nothing for no rows."""
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_backbones(rows: List[dict], path: Path, title: str) -> None:
    """Backbone latency and peak memory against pixels, log-log: a colour per variant, a line
    style per dtype."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows))}
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    for variant, dtype_name in dict.fromkeys((r["variant"], r["dtype"]) for r in rows):
        line = sorted((r for r in rows if r["variant"] == variant and r["dtype"] == dtype_name), key=lambda r: r["size"])
        pixels = [r["size"] ** 2 for r in line]
        for ax, key in zip(axes, ("latency_ms", "peak_mem_mib")):
            ax.plot(pixels, [r[key] for r in line], styles[dtype_name], color=colors[variant], marker="o",
                    label=f"{variant} {dtype_name}")
    for ax, label in zip(axes, ("latency (ms, median)", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("pixels (square input)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def write_summary(path: Path, results: Dict[str, List[dict]], machine: dict, command: str) -> None:
    """Every table of ``results`` (by name, see :data:`TABLES`) in Markdown, under the command and
    the machine that produced them."""
    lines = ["# Benchmark", "", "```", command, "```", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    for name in TABLES:
        rows = results.get(name)
        if not rows:
            continue
        fields = list(dict.fromkeys(key for row in rows for key in row))
        lines += [f"## {name}", "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        lines += ["| " + " | ".join(_cell(row.get(f)) for f in fields) + " |" for row in rows]
        lines.append("")
    path.write_text("\n".join(lines))


def format_targets(targets: List[dict]) -> str:
    """The targets (see :func:`~castling_det.analysis.targets.benchmark_targets`) as aligned
    text: name, measured value, limit, met."""
    lines = [f"{'target':<48} {'measured':>12} {'limit':>8}  met"]
    for row in targets:
        value = "-" if row["measured"] is None else f"{row['measured']:.4g}"
        lines.append(f"{row['target']:<48} {value:>12} {row['limit']:>8}  {row['met']}")
    return "\n".join(lines)
