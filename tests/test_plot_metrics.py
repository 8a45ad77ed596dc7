"""tools/plot_metrics.py (castling-plot-metrics): metrics.json read and merged (resumed runs,
malformed lines), and the PNGs."""
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from castling_det.analysis.curves import plot_training_curves
from castling_det.analysis.metrics_log import block_summary, metric_series, read_metrics
from castling_det.commands import plot_metrics


def _training(iteration, total_loss, mass=None):
    record = {"iteration": iteration, "total_loss": total_loss, "loss_cls": total_loss / 2,
              "loss_branch_l1": 0.01, "branch/scale": 1.0, "branch/l1_weight": 0.5}
    if mass is not None:
        record.update({"branch/mass/block0": mass, "branch/mass/block1": 3 * mass,
                       "branch/share/block0": mass / 10, "branch/share/block1": mass / 5})
    return json.dumps(record)


def _evaluation(iteration, ap_on, ap_off):
    return json.dumps({"iteration": iteration, "branch_on/bbox/AP": ap_on, "branch_off/bbox/AP": ap_off,
                       "branch_on/bbox/AP50": 90.0, "branch_off/bbox/APl": float("nan")})


@pytest.fixture
def resumed_run(tmp_path):
    """A run resumed after iteration 39: iterations 39 and 40 appear twice, the later ones win;
    two malformed lines (a cut-off line, a record without an iteration)."""
    run = tmp_path / "resumed"
    run.mkdir()
    lines = [
        _training(19, 2.0, mass=0.02),
        _training(39, 1.5, mass=0.04),
        _evaluation(40, 10.0, 9.0),
        '{"iteration": 59, "total_lo',
        _training(39, 1.4, mass=0.01),
        json.dumps({"total_loss": 3.0}),
        _evaluation(40, 12.0, 11.0),
        _training(59, 1.0),
    ]
    (run / "metrics.json").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def metrics_log(caplog):
    """Warnings of the metrics reader (Detectron2's setup_logger may stop castling_det's loggers
    from propagating to the root logger)."""
    logger = logging.getLogger("castling_det.analysis.metrics_log")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_read_metrics_keeps_the_last_record_of_each_iteration_and_counts_malformed_lines(
    resumed_run, metrics_log
):
    records = read_metrics(str(resumed_run))
    assert [r["iteration"] for r in records] == [19, 39, 40, 59]
    assert metric_series(records, "total_loss") == ([19, 39, 59], [2.0, 1.4, 1.0])
    assert metric_series(records, "branch_on/bbox/AP") == ([40], [12.0])
    assert metric_series(records, "branch_off/bbox/APl") == ([], [])  # NaN left out
    iterations, means, maxima = block_summary(records, "branch/mass/")
    assert iterations == [19, 39]
    assert means == pytest.approx([0.04, 0.02]) and maxima == pytest.approx([0.06, 0.03])
    (message,) = {r.getMessage() for r in metrics_log.records}  # a set: the root may have it too
    assert "skipped 2 malformed line(s) (line 4, 6)" in message and "metrics.json" in message


def test_read_metrics_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.json")):
        read_metrics(str(tmp_path))


def test_plot_training_curves_writes_one_png_per_figure_with_a_line_per_run(resumed_run, tmp_path):
    runs = {"resumed": read_metrics(str(resumed_run)), "again": read_metrics(str(resumed_run))}
    written = plot_training_curves(runs, tmp_path / "plots")
    assert [p.name for p in written] == ["losses.png", "ap.png", "branch.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something drawn, not a blank page


def test_a_run_without_evaluations_gets_no_ap_figure(tmp_path):
    (tmp_path / "metrics.json").write_text(_training(19, 2.0) + "\n" + _training(39, 1.0) + "\n")
    written = plot_training_curves({"run": read_metrics(str(tmp_path))}, tmp_path / "plots")
    assert [p.name for p in written] == ["losses.png", "branch.png"]


def test_the_tool_plots_two_runs_and_names_a_missing_one(resumed_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(resumed_run / "metrics.json", other / "metrics.json")
    plot_metrics.main([str(resumed_run), str(other / "metrics.json"), "--output", str(tmp_path / "plots")])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ap.png", "branch.png", "losses.png"]
    assert all(p.stat().st_size > 0 for p in (tmp_path / "plots").iterdir())
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=f"metrics file {missing / 'metrics.json'} does not exist"):
        plot_metrics.main([str(resumed_run), str(missing), "--output", str(tmp_path / "plots")])
