"""castling_det.commands.benchmark_accuracy (tools/benchmark_accuracy.py) and
castling_det.analysis.accuracy_runs and branch_stats: schedules, run plans and resumption, result
aggregation, the softmax branch's trajectory and the report's tables and figures, with expected
values worked out by hand. No training."""
import json
import os
import shlex
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from castling_det.analysis import (
    AblationError,
    Schedule,
    branch_gap_mean,
    branch_trajectory,
    build_result,
    check_teacher,
    checkpoint_period,
    curve_points,
    downsample_indices,
    first_half_branch_stats,
    format_mean_std,
    load_run_time,
    mean_std,
    parse_schedule,
    plan_run,
    prune_checkpoints,
    reduce_evaluations,
    results_markdown,
    run_decision,
    schedule_overrides,
    summarize_arm,
    write_json_atomic,
)
from castling_det.analysis.accuracy_figures import plot_accuracy, plot_branch
from castling_det.analysis.readme_tables import BEGIN_MARKER, END_MARKER, readme_tables, replace_marked_block
from castling_det.commands import benchmark_accuracy as tool

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = "/data/bccd"  # any folder: the test compares commands
# The command the curve's softmax seed-0 run was started with by hand (ROOT = DATA_ROOT).
HAND_STARTED = (
    "tools/train_net.py --config-file configs/BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml "
    "--register-voc bccd_train ROOT train RBC,WBC,Platelets --register-voc bccd_val ROOT val RBC,WBC,Platelets "
    "OUTPUT_DIR output/benchmark_accuracy/curve/softmax-seed0 MODEL.CASTLING.ATTN_KINDS '[\"softmax\"]' "
    "SOLVER.MAX_ITER 2400 SOLVER.STEPS '(1920, 2280)' TEST.EVAL_PERIOD 300 SOLVER.CHECKPOINT_PERIOD 300 SEED 0"
)


@pytest.mark.parametrize(
    "name, expected",
    [
        # 0.8 * 600, 0.95 * 600, 600 / 4; divisors of 300 up to 200: the largest is 150.
        ("iters600", Schedule("iters600", 600, (480, 570), 150, 150)),
        # divisors of 600 up to 200: 200 itself.
        ("iters1200", Schedule("iters1200", 1200, (960, 1140), 300, 200)),
        # 6.4 and 7.6 round down; half of 8 is 4, its own largest divisor.
        ("iters8", Schedule("iters8", 8, (6, 7), 2, 4)),
        ("curve", Schedule("curve", 2400, (1920, 2280), 300, 300)),
    ],
)
def test_parse_schedule(name, expected):
    assert parse_schedule(name) == expected


@pytest.mark.parametrize("name", ["iters601", "iters0", "iters", "iters-8", "epochs12", "Curve"])
def test_bad_schedule_names_are_refused(name):
    with pytest.raises(AblationError, match="schedule"):
        parse_schedule(name)


def test_schedule_overrides():
    assert schedule_overrides(parse_schedule("iters1200"), 2) == [
        "SOLVER.MAX_ITER", "1200", "SOLVER.STEPS", "(960, 1140)", "TEST.EVAL_PERIOD", "300",
        "SOLVER.CHECKPOINT_PERIOD", "200", "SEED", "2",
    ]


def test_checkpoint_period_divides_half_and_is_at_most_200():
    # Hand values: half 500 -> 125 (250 > 200); half 700 -> 175; half 4 -> 4;
    # half 1012 = 4 * 11 * 23 -> 92 (the next divisor, 11 * 23 = 253, is over 200).
    assert [checkpoint_period(s) for s in (1000, 1400, 8, 2024)] == [125, 175, 4, 92]
    for iterations in range(8, 5000, 8):
        period = checkpoint_period(iterations)
        assert period <= 200 and (iterations // 2) % period == 0, iterations


def test_curve_softmax_seed0_command_is_the_hand_started_one():
    plan = plan_run(tool.ARMS, "softmax", parse_schedule("curve"), 0, "output/benchmark_accuracy", "runs")
    command = tool.train_command(DATA_ROOT, plan.overrides, resume=False)
    assert command[0] == sys.executable
    assert command[1:] == shlex.split(HAND_STARTED.replace("ROOT", DATA_ROOT))
    assert plan.output_dir == Path("output/benchmark_accuracy/curve/softmax-seed0")
    assert plan.result_file == Path("runs/curve/softmax-seed0.json")
    assert plan.extra_opts == []


def test_iters600_window_overrides_and_extra_opts():
    plan = plan_run(tool.ARMS, "window", parse_schedule("iters600"), 1, "W", "R", ["SOLVER.WARMUP_ITERS", "2"])
    kinds = ["window", "window", "softmax"] * 4
    assert plan.overrides == [
        "OUTPUT_DIR", "W/iters600/window-seed1", "MODEL.CASTLING.ATTN_KINDS", json.dumps(kinds),
        "SOLVER.MAX_ITER", "600", "SOLVER.STEPS", "(480, 570)", "TEST.EVAL_PERIOD", "150",
        "SOLVER.CHECKPOINT_PERIOD", "150", "SEED", "1", "SOLVER.WARMUP_ITERS", "2",
    ]
    assert plan.extra_opts == ["SOLVER.WARMUP_ITERS", "2"]
    assert (plan.own_iterations, plan.total_iterations, plan.teacher_checkpoint) == (600, 600, None)


def test_switching_arm_starts_from_its_teacher_at_half():
    plan = plan_run(tool.ARMS, "castling-switch", parse_schedule("iters600"), 1, "W", "R")
    # Own half: 300 iterations, steps at 240 and 285, evaluated every 600 / 8, and checkpoints
    # every 150 (largest divisor of 150 up to 200); the teacher saved model_0000299 at 300.
    teacher = Path("W/iters600/softmax-seed1/model_0000299.pth")
    assert plan.teacher_checkpoint == teacher
    assert (plan.own_iterations, plan.total_iterations) == (300, 600)
    overrides = plan.overrides
    for key, value in [("SOLVER.MAX_ITER", "300"), ("SOLVER.STEPS", "(240, 285)"), ("TEST.EVAL_PERIOD", "75"),
                       ("SOLVER.CHECKPOINT_PERIOD", "150"), ("MODEL.WEIGHTS", str(teacher)),
                       ("MODEL.CASTLING.TRANSFER.LOSS_WEIGHT", "1.0"), ("MODEL.CASTLING.BRANCH.MASK", "relative")]:
        assert overrides[overrides.index(key) + 1] == value, key
    curve = plan_run(tool.ARMS, "castling-switch", parse_schedule("curve"), 0, "W", "R")
    assert curve.teacher_checkpoint == Path("W/curve/softmax-seed0/model_0001199.pth")
    assert (curve.own_iterations, curve.total_iterations) == (1200, 2400)


def test_only_the_teacher_arm_keeps_its_half_checkpoint():
    schedule = parse_schedule("iters600")
    assert plan_run(tool.ARMS, "softmax", schedule, 0, "W", "R").keep_checkpoint == "model_0000299.pth"
    assert plan_run(tool.ARMS, "castling", schedule, 0, "W", "R").keep_checkpoint is None


def test_castling_arms_pin_their_recipe_key_by_key():
    """Every arm with castling blocks names its convolution, mask and L1 weight (each key once), so
    its stored results keep their meaning when the configs' defaults change."""
    pinned = ("MODEL.CASTLING.CONV_KIND", "MODEL.CASTLING.BRANCH.MASK", "MODEL.CASTLING.BRANCH.L1_WEIGHT")
    castling_arms = [name for name, arm in tool.ARMS.items() if "castling" in arm.overrides[1]]
    assert len(castling_arms) == len(tool.ARMS) - 2  # all but softmax and window
    for name in castling_arms:
        keys = tool.ARMS[name].overrides[0::2]
        assert len(keys) == len(set(keys)), name
        assert all(key in keys for key in pinned), name
    castling = dict(zip(*[iter(tool.ARMS["castling"].overrides)] * 2))
    assert (castling["MODEL.CASTLING.CONV_KIND"], castling["MODEL.CASTLING.BRANCH.MASK"]) == ("seq", "absolute")
    grid5 = dict(zip(*[iter(tool.ARMS["castling-grid5"].overrides)] * 2))
    assert (grid5["MODEL.CASTLING.CONV_KIND"], grid5["MODEL.CASTLING.CONV_KERNEL_SIZE"]) == ("grid", "5")


@pytest.mark.parametrize("name", ["castling-relative-sum", "castling-learned-weight", "hybrid"])
def test_default_recipe_variants_change_one_thing(name):
    """The variants of the default recipe keep its every key but the one they vary, so each is
    measured against the arm with three seeds."""
    default = dict(zip(*[iter(tool.ARMS["castling-relative"].overrides)] * 2))
    variant = dict(zip(*[iter(tool.ARMS[name].overrides)] * 2))
    changed = {key for key in default.keys() | variant.keys() if default.get(key) != variant.get(key)}
    assert len(changed) == 1, (name, changed)


@pytest.mark.parametrize("name", sorted(tool.ARMS))
def test_every_arm_builds_a_backbone_that_trains(name):
    """Each arm's keys merge into the BCCD config and give a backbone that runs a training step,
    its softmax branch (where it has one) on: a typo in an arm would otherwise surface hours
    into a series."""
    from detectron2.modeling import build_backbone
    from detectron2.utils.events import EventStorage

    from castling_det import load_castling_config
    from castling_det.modeling import branch_modules

    cfg = load_castling_config(str(REPO / tool.CONFIG), list(tool.ARMS[name].overrides))
    backbone = build_backbone(cfg).train()
    castling_blocks = 12 if name.startswith("castling") else 4 if name == "hybrid" else 0
    branch_on = [module.branch_active for module in branch_modules(backbone)]
    assert branch_on == [cfg.MODEL.CASTLING.BRANCH.ENABLED] * castling_blocks
    with EventStorage(0):
        features = backbone(torch.randn(1, 3, 64, 96))
        sum(feature.square().mean() for feature in features.values()).backward()
    assert all(feature.isfinite().all() for feature in features.values())
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


def test_unknown_arm_is_named():
    with pytest.raises(AblationError, match="unknown arm 'castling-fast'.*softmax, window"):
        plan_run(tool.ARMS, "castling-fast", parse_schedule("iters600"), 0, "W", "R")


def test_missing_teacher_checkpoint_names_file_and_command(tmp_path):
    plan = plan_run(tool.ARMS, "castling-switch", parse_schedule("iters16"), 3, tmp_path, "R")
    teacher = tmp_path / "iters16/softmax-seed3/model_0000007.pth"
    with pytest.raises(AblationError) as error:
        check_teacher(plan, "run --arms softmax --seeds 3")
    assert str(teacher) in str(error.value) and "run --arms softmax --seeds 3" in str(error.value)
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"")
    check_teacher(plan, "unused")


def test_resumability_decisions_and_resume_flag(tmp_path):
    plan = plan_run(tool.ARMS, "softmax", parse_schedule("iters8"), 0, tmp_path / "work", tmp_path / "runs")
    assert run_decision(plan) == "start"
    plan.output_dir.mkdir(parents=True)
    (plan.output_dir / "last_checkpoint").write_text("model_0000003.pth")
    assert run_decision(plan) == "resume"
    # A run evaluated before its end is not finished, even with a model_final.pth.
    (plan.output_dir / "model_final.pth").write_bytes(b"")
    (plan.output_dir / "branch_switch.json").write_text(json.dumps([{"iteration": 4}]))
    assert run_decision(plan) == "resume"
    (plan.output_dir / "branch_switch.json").write_text(json.dumps([{"iteration": 4}, {"iteration": 8}]))
    assert run_decision(plan) == "collect"
    plan.result_file.parent.mkdir(parents=True)
    plan.result_file.write_text("{}")
    assert run_decision(plan) == "skip"

    command = tool.train_command("ROOT", plan.overrides, resume=True)
    assert command[command.index("OUTPUT_DIR") - 1] == "--resume"
    assert "--resume" not in tool.train_command("ROOT", plan.overrides, resume=False)


def test_run_skips_stored_results_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # run() moves to the repository; this restores the directory after
    data = tmp_path / "bccd"
    (data / "ImageSets/Main").mkdir(parents=True)
    for split in ("train", "val"):
        (data / f"ImageSets/Main/{split}.txt").write_text("x\n")
    for arm in ("castling", "softmax"):
        result = tmp_path / f"runs/iters8/{arm}-seed0.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text("{}")
    monkeypatch.setattr(tool, "train", lambda *a, **k: pytest.fail("a stored run was trained again"))
    args = Namespace(schedule="iters8", arms=["castling", "softmax"], seeds=[0], data_root=str(data),
                     work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "runs"), opts=[])
    tool.run_series(args)
    out = capsys.readouterr().out
    assert "skip iters8 castling seed 0" in out and "skip iters8 softmax seed 0" in out


def test_train_runs_train_net_with_the_thread_count_and_records_it(tmp_path, monkeypatch):
    launched = []

    class FinishedProcess:
        def __init__(self, command, cwd, env):
            launched.append((command, env))

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(tool, "git_commit", lambda: "abc")
    monkeypatch.setattr(tool.subprocess, "Popen", FinishedProcess)
    plan = plan_run(tool.ARMS, "castling", parse_schedule("iters8"), 0, tmp_path, tmp_path / "runs")
    tool.train(plan, "bccd", resume=False, threads=1)
    (command, env), = launched
    assert env["OMP_NUM_THREADS"] == "1" and command[1] == tool.TRAIN_NET
    assert [segment["threads"] for segment in load_run_time(plan.output_dir)["segments"]] == [1]


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(AblationError, match=f"{tmp_path / 'nowhere'}.*train"):
        tool.check_data_root(str(tmp_path / "nowhere"))


def test_live_trainer_on_the_same_folder_is_found(tmp_path):
    # A stand-in whose command line looks like train_net's, run from tmp_path with a relative OUTPUT_DIR.
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "tools/train_net.py", "OUTPUT_DIR", "run"],
        cwd=tmp_path,
    )
    try:
        time.sleep(0.5)
        assert tool.running_trainer(tmp_path / "run") == process.pid
        assert tool.running_trainer(tmp_path / "other") is None
    finally:
        process.terminate()
        process.wait()


def test_mean_std_and_format():
    # mean of 40, 42, 47 = 43; squared deviations 9 + 1 + 16 = 26; sample std sqrt(26 / 2) = 3.606.
    mean, std = mean_std([40.0, 42.0, 47.0])
    assert mean == pytest.approx(43.0) and std == pytest.approx(3.6056, abs=1e-4)
    assert format_mean_std([40.0, 42.0, 47.0]) == "43.0 ± 3.6 [40.0, 42.0, 47.0]"
    assert mean_std([41.25]) == (41.25, None)
    assert format_mean_std([41.25]) == "41.2 ± — [41.2]"


def _metrics_line(iteration, masses=None, shares=None):
    record = {"iteration": iteration, "total_loss": 1.0}
    for block, value in (masses or {}).items():
        record[f"branch/mass/block{block}"] = value
    for block, value in (shares or {}).items():
        record[f"branch/share/block{block}"] = value
    return json.dumps(record)


def test_first_half_branch_stats(tmp_path):
    # 100 iterations: records at 19, 39, 49 count; 50 and 79 (second half) would change every median.
    lines = [
        _metrics_line(19, {3: 0.10, 7: 0.01}, {3: 0.3, 7: 0.1}),
        _metrics_line(39, {3: 0.06, 7: 0.03}, {3: 0.5, 7: 0.2}),
        _metrics_line(49, {3: 0.20, 7: 0.02}, {3: 0.4, 7: 0.3}),
        json.dumps({"iteration": 49.5}),  # malformed: skipped
        _metrics_line(50, {3: 0.0, 7: 0.9}, {3: 0.0, 7: 0.9}),
        _metrics_line(79, {3: 0.0, 7: 0.9}, {3: 0.0, 7: 0.9}),
    ]
    (tmp_path / "metrics.json").write_text("\n".join(lines) + "\n")
    stats = first_half_branch_stats(tmp_path / "metrics.json", 100)
    # block3 masses 0.10, 0.06, 0.20 -> median 0.10 (> 5 %); block7 0.01, 0.03, 0.02 -> 0.02.
    assert stats["records"] == 3
    assert stats["blocks"]["block3"] == pytest.approx({"kept_mass": 0.10, "share": 0.4})
    assert stats["blocks"]["block7"] == pytest.approx({"kept_mass": 0.02, "share": 0.2})
    assert (stats["blocks_kept_mass_above_5pct"], stats["num_blocks"]) == (1, 2)


def test_first_half_branch_stats_without_castling_blocks(tmp_path):
    (tmp_path / "metrics.json").write_text(_metrics_line(19) + "\n" + _metrics_line(39) + "\n")
    assert first_half_branch_stats(tmp_path / "metrics.json", 100) == {
        "records": 0, "blocks": None, "blocks_kept_mass_above_5pct": None, "num_blocks": None,
    }


def test_reduce_evaluations_keeps_the_last_record_of_an_iteration():
    def evaluation(iteration, ap_off, ap_on=None):
        record = {"iteration": iteration, "train_branch_scale": 1.0,
                  "branch_off": {"bbox": {"AP": ap_off, "AP50": 2 * ap_off, "APs": 0.0}, "gflops": {"model": 1.0}}}
        if ap_on is not None:
            record["branch_on"] = {"bbox": {"AP": ap_on, "AP50": 2 * ap_on}, "gflops": {"model": 2.0}}
        return record

    # Resumed after iteration 4: its evaluation was run again; 8 is the final one.
    records = [evaluation(4, 1.0, 1.5), evaluation(4, 2.0, 2.5), evaluation(8, 3.0)]
    assert reduce_evaluations(records) == [
        {"iteration": 4, "branch_off": {"AP": 2.0, "AP50": 4.0}, "branch_on": {"AP": 2.5, "AP50": 5.0}},
        {"iteration": 8, "branch_off": {"AP": 3.0, "AP50": 6.0}},
    ]


def test_run_time_and_result_fields(tmp_path):
    plan = plan_run(tool.ARMS, "castling-switch", parse_schedule("iters16"), 0, tmp_path, tmp_path / "runs")
    assert load_run_time(plan.output_dir) == {"segments": [], "untimed_prior_run": False}
    plan.output_dir.mkdir(parents=True)
    (plan.output_dir / "metrics.json").write_text(_metrics_line(1) + "\n")  # trained by hand
    assert load_run_time(plan.output_dir)["untimed_prior_run"] is True
    run_time = {"segments": [{"commit": "abc", "seconds": 100.0}, {"commit": "abc", "seconds": 20.5, "threads": 1},
                             {"commit": "def-dirty", "seconds": 1.0, "threads": 2}], "untimed_prior_run": False}
    evaluations = [{"iteration": 8, "branch_off": {"AP": 1.0, "AP50": 2.0}}]
    result = build_result(plan, evaluations, 6.5, run_time, {"records": 0}, None, {"cpus": 2})
    assert (result["wall_seconds"], result["segments"], result["commit"]) == (121.5, 3, "abc, def-dirty")
    assert result["segment_threads"] == [None, 1, 2]
    assert (result["total_iterations"], result["own_iterations"]) == (16, 8)
    assert result["final"] == evaluations[-1] and result["overrides"] == plan.overrides
    assert result["extra_opts"] == []
    assert result["teacher_checkpoint"] == str(tmp_path / "iters16/softmax-seed0/model_0000007.pth")
    with pytest.raises(AblationError, match="no evaluation"):
        build_result(plan, [], 6.5, run_time, {"records": 0}, None, {"cpus": 2})


def test_prune_keeps_final_and_teacher_checkpoints(tmp_path):
    for name in ("model_0000003.pth", "model_0000007.pth", "model_final.pth", "last_checkpoint"):
        (tmp_path / name).write_bytes(b"")
    assert prune_checkpoints(tmp_path, keep="model_0000003.pth") == ["model_0000007.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000003.pth", "model_final.pth"]


MACHINE = {"model_name": "Test CPU", "cpus": 2, "avx512f": True, "amx_tile": False}


def _result(arm, seed, ap_off, ap50_off, gmacs, schedule="iters600", ap_on=None, kept=None, wall=600.0,
            untimed=False, evaluations=None, own=600, total=600, extra_opts=(), threads=(None,), teacher=None):
    final = {"iteration": own, "branch_off": {"AP": ap_off, "AP50": ap50_off}}
    if ap_on is not None:
        final["branch_on"] = {"AP": ap_on, "AP50": 0.0}
    stats = {"records": 5, "blocks": {}, "blocks_kept_mass_above_5pct": kept[0], "num_blocks": kept[1]} if kept \
        else {"records": 0, "blocks": None, "blocks_kept_mass_above_5pct": None, "num_blocks": None}
    return {"arm": arm, "description": f"{arm} arm", "schedule": schedule, "seed": seed,
            "total_iterations": total, "own_iterations": own, "teacher_checkpoint": teacher,
            "evaluations": evaluations or [final],
            "final": final, "vit_gmacs_640x480": gmacs, "wall_seconds": wall, "segments": len(threads),
            "segment_threads": list(threads),
            "untimed_prior_run": untimed, "branch_first_half": stats, "machine": MACHINE, "commit": "abc123",
            "extra_opts": list(extra_opts)}


def test_markdown_table_holds_the_hand_computed_values():
    results = [
        _result("window", 0, 45.0, 80.0, 10.5, wall=900.0, untimed=True, extra_opts=["SOLVER.WARMUP_ITERS", "2"]),
        # AP off 40, 42, 47 -> 43.0 ± 3.6; gaps 1, 2, 1.5 -> +1.5; AP50 70, 72, 77 -> 73.0;
        # 7.0 / 10.5 = 0.67 of the window arm's GMACs; walls 10, 20, 30 min -> 20.0.
        _result("castling", 2, 47.0, 77.0, 7.0, ap_on=48.5, kept=(3, 12), wall=1800.0),
        _result("castling", 0, 40.0, 70.0, 7.0, ap_on=41.0, kept=(2, 12), wall=600.0),
        _result("castling", 1, 42.0, 72.0, 7.0, ap_on=44.0, kept=(3, 12), wall=1200.0, threads=(2, 2)),
        # A run trained in part with 1 thread on 2 CPUs: its minutes are marked ‡.
        _result("softmax", 0, 41.0, 71.0, 13.0, wall=3000.0, threads=(2, 1)),
        _result("softmax", 0, 10.0, 0.0, 13.0, schedule="curve", own=2400, total=2400, evaluations=[
            {"iteration": 300, "branch_off": {"AP": 10.0}}, {"iteration": 600, "branch_off": {"AP": 20.5}}]),
        _result("castling-switch", 0, 30.4, 0.0, 7.0, schedule="curve", own=1200, total=2400, evaluations=[
            {"iteration": 300, "branch_off": {"AP": 30.4}}]),
    ]
    lines = results_markdown(results, list(tool.ARMS)).splitlines()
    assert lines.index("## curve") < lines.index("## iters600")
    assert "| arm | seed | AP @ 300 | AP @ 600 | AP @ 1500 |" in lines
    assert "| softmax | 0 | 10.0 | 20.5 | — |" in lines
    assert "| castling-switch | 0 | — | — | 30.4 |" in lines
    # The curve's final evaluations make an ablation table too (switching arm marked †).
    curve_rows = lines[lines.index("## curve"):lines.index("## iters600")]
    assert any(row.startswith("| softmax | softmax arm | 0 (1) | 10.0 ± — [10.0] |") for row in curve_rows)
    assert any(row.startswith("| castling-switch † | castling-switch arm | 0 (1) | 30.4 ± — [30.4] |")
               for row in curve_rows)
    assert "| window | window arm | 0 (1) | 45.0 ± — [45.0] | 80.0 | — | 10.50 | 1.00 | — | 600 | — * |" in lines
    assert ("| castling | castling arm | 0, 1, 2 (3) | 43.0 ± 3.6 [40.0, 42.0, 47.0] | 73.0 | +1.5 | 7.00 | 0.67 "
            "| 2/12, 3/12, 3/12 | 600 | 20.0 |") in lines
    assert "| softmax | softmax arm | 0 (1) | 41.0 ± — [41.0] | 71.0 | — | 13.00 | 1.24 | — | 600 | 50.0 ‡ |" in lines
    assert lines.index("| window | window arm | 0 (1) | 45.0 ± — [45.0] | 80.0 | — | 10.50 | 1.00 | — | 600 | — * |") \
        < [i for i, line in enumerate(lines) if line.startswith("| castling | ")][0]  # the table's arm order
    assert "Machine(s): Test CPU, 2 CPUs (avx512f yes, amx_tile no)." in lines
    assert "Commit(s): abc123." in lines
    assert lines.count("Extra overrides: `SOLVER.WARMUP_ITERS 2`.") == 1  # the iters600 table's only


def test_curve_points_offset_a_switching_arm_by_its_teacher():
    result = _result("castling-switch", 0, 1.0, 0.0, 7.0, own=1200, total=2400, evaluations=[
        {"iteration": 300, "branch_off": {"AP": 5.0}}, {"iteration": 1200, "branch_off": {"AP": 9.0}}])
    assert curve_points(result) == ([1500, 2400], [5.0, 9.0])


def test_downsample_indices_keep_first_and_last():
    assert downsample_indices(5, 100) == [0, 1, 2, 3, 4]
    assert downsample_indices(7, 4) == [0, 2, 4, 6]  # steps of 6 / 3
    indices = downsample_indices(120, 100)  # the curve schedule logs 120 records
    assert len(indices) == 100 and (indices[0], indices[-1]) == (0, 119)
    assert all(a < b for a, b in zip(indices, indices[1:]))


def _branch_line(iteration, scale, masses, shares):
    record = {"iteration": iteration, "branch/scale": scale, "total_loss": 1.0}
    record.update({f"branch/mass/block{b}": v for b, v in masses.items()})
    record.update({f"branch/share/block{b}": v for b, v in shares.items()})
    return json.dumps(record)


def test_branch_trajectory_is_downsampled_with_nulls_where_not_measured(tmp_path):
    lines = [
        _branch_line(4, 1.0, {0: 0.123456, 2: 0.2, 10: 0.5}, {0: 0.0123456, 2: 0.02}),
        json.dumps({"iteration": 9, "bbox/AP": 3.0}),  # an evaluation: no branch key, not a point
        _branch_line(14, 1.0, {0: 0.1, 2: 0.2}, {0: 0.01, 2: 0.02}),
        _branch_line(24, 1.0, {0: 0.05, 2: 1e-7}, {0: 0.005, 2: 0.0}),
        _branch_line(34, 0.75, {0: 0.04, 2: 0.1}, {0: 0.004, 2: 0.01}),
        _branch_line(44, 0.5, {0: 0.03, 2: 0.1}, {0: 0.003, 2: 0.01}),
        _branch_line(54, 0.0, {}, {}),  # scale 0: the branch is not computed, nothing measured
        _branch_line(64, 0.0, {}, {}),
    ]
    (tmp_path / "metrics.json").write_text("\n".join(lines) + "\n")
    # 7 records with branch keys, at most 4 points: indices 0, 2, 4, 6.
    assert branch_trajectory(tmp_path / "metrics.json", max_points=4) == {
        "records": 7,
        "iterations": [4, 24, 44, 64],
        "scale": [1.0, 1.0, 0.5, 0.0],
        "l1_weight": None,  # not logged
        "kept_mass": {  # blocks in numeric order, 4 significant digits
            "block0": [0.1235, 0.05, 0.03, None],
            "block2": [0.2, 1e-7, 0.1, None],
            "block10": [0.5, None, None, None],
        },
        "share": {"block0": [0.01235, 0.005, 0.003, None], "block2": [0.02, 0.0, 0.01, None],
                  "block10": [None, None, None, None]},
    }
    assert branch_trajectory(tmp_path / "metrics.json")["iterations"] == [4, 14, 24, 34, 44, 54, 64]


def test_branch_trajectory_of_a_run_without_branch_is_none(tmp_path):
    # A softmax run logs the schedule's scalars but no block statistic.
    (tmp_path / "metrics.json").write_text(_branch_line(19, 1.0, {}, {}) + "\n" + _branch_line(39, 1.0, {}, {}) + "\n")
    assert branch_trajectory(tmp_path / "metrics.json") is None


def test_result_files_keep_number_lists_on_one_line(tmp_path):
    data = {"iterations": [4, 24], "share": {"block0": [0.5, None]}, "overrides": ["KINDS", '["a",  "b"]'], "empty": []}
    write_json_atomic(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == data
    assert '"iterations": [4, 24],' in text and '"block0": [0.5, null]' in text
    assert '  "[\\"a\\",  \\"b\\"]"' in text  # a string is left as it is, on its own line


def _first_half(kept, blocks):
    return {"records": 3, "blocks": blocks, "blocks_kept_mass_above_5pct": kept, "num_blocks": len(blocks)}


def _trajectory(iterations, scale, shares, masses=None):
    return {"records": len(iterations), "iterations": iterations, "scale": scale, "l1_weight": None,
            "kept_mass": masses or shares, "share": shares}


def _branch_results():
    """castling (seed 0 with a trajectory, seed 1 recorded before trajectories) and softmax."""
    castling = _result("castling", 0, 40.0, 70.0, 7.0, ap_on=41.0)
    # First-half shares 0.1, 0.3, 0.2 -> median 20 %; masses 0.2 and 0.06 above 5 %, 0.01 not.
    castling["branch_first_half"] = _first_half(2, {
        "block0": {"kept_mass": 0.2, "share": 0.1}, "block1": {"kept_mass": 0.01, "share": 0.3},
        "block2": {"kept_mass": 0.06, "share": 0.2}})
    # Last measured at 300: shares 0.05, 0.01, 0.03 -> median 3 %; scale 0 from 480.
    castling["branch_trajectory"] = _trajectory(
        [0, 300, 480, 599], [1.0, 0.5, 0.0, 0.0],
        {"block0": [0.1, 0.05, None, None], "block1": [0.3, 0.01, None, None], "block2": [0.2, 0.03, None, None]},
        {"block0": [0.2, 0.06, None, None], "block1": [0.0, 0.01, None, None], "block2": [0.1, 0.2, None, None]})
    older = _result("castling", 1, 42.0, 72.0, 7.0, ap_on=44.0)
    older["branch_first_half"] = _first_half(1, {
        "block0": {"kept_mass": 0.2, "share": 0.1}, "block1": {"kept_mass": 0.0, "share": 0.1}})
    softmax = _result("softmax", 0, 45.0, 80.0, 13.0)
    softmax["branch_trajectory"] = None
    return [castling, older, softmax]


def test_branch_table_counts_blocks_and_names_arms_without_branch():
    lines = results_markdown(_branch_results(), list(tool.ARMS)).splitlines()
    table = lines[lines.index("## Softmax branch"):]
    assert "| iters600 | softmax | 0 | no branch | — | — | — |" in table
    assert "| iters600 | castling | 0, 1 | 2/3, 1/2 | 20 %, 10 % | 3 % @ 300, not recorded | 480, not recorded |" in table
    # A result stored before trajectories existed, without a branch: no branch either.
    assert "| iters600 | window | 0 | no branch | — | — | — |" in results_markdown(
        [_result("window", 0, 45.0, 80.0, 10.5)]).splitlines()


def test_report_writes_tables_and_both_figures(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "report"
    for result in _branch_results():
        write_json_atomic(runs / result["schedule"] / f"{result['arm']}-seed{result['seed']}.json", result)
    tool.run(["report", "--results-dir", str(runs), "--output-dir", str(out)])
    for figure in ("accuracy.png", "branch.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert "| iters600 | softmax | 0 | no branch | — | — | — |" in (out / "results.md").read_text().splitlines()
    assert "branch.png: iters600 castling seed 0" in capsys.readouterr().out  # seed 1 has no trajectory


def test_accuracy_figure_ranks_the_curve_schedule_arms_by_their_final_evaluation(tmp_path):
    """The ablation runs on the curve schedule itself: its arms' final AP (mean ± std over seeds)
    are the figure's rows, in the arms' order, beside those of any other schedule."""
    def curve(arm, seed, aps, gmacs):
        evaluations = [{"iteration": 300 * (i + 1), "branch_off": {"AP": ap}} for i, ap in enumerate(aps)]
        return _result(arm, seed, aps[-1], 80.0, gmacs, schedule="curve", own=2400, total=2400,
                       evaluations=evaluations)
    results = [
        curve("castling", 1, [40.0, 50.0], 7.0), curve("castling", 0, [45.0, 52.0], 7.0),
        curve("softmax", 0, [44.0, 51.0], 13.0), _result("window", 0, 45.0, 80.0, 10.5),
    ]
    rows = plot_accuracy(results, list(tool.ARMS), tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(row["schedule"], row["arm"]) for row in rows] == [
        ("curve", "softmax"), ("curve", "castling"), ("iters600", "window")
    ]
    castling = rows[1]
    assert castling["ap"] == [52.0, 50.0] and castling["ap_mean"] == 51.0 and castling["gmacs"] == 7.0
    assert castling["ap_std"] == pytest.approx(2 ** 0.5)


def test_branch_figure_draws_one_seed_per_arm(tmp_path):
    castling = _branch_results()[0]
    second_seed = {**castling, "seed": 1}
    drawn = plot_branch([second_seed, castling], list(tool.ARMS), tmp_path / "branch.png")
    assert drawn == ["iters600 castling seed 0"]


def test_branch_figure_without_any_branch_is_a_note(tmp_path):
    softmax = _branch_results()[2]
    assert plot_branch([softmax], list(tool.ARMS), tmp_path / "branch.png") == []
    assert (tmp_path / "branch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_rewrites_stored_results_without_training_or_pruning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # record() moves to the repository; this restores the directory after
    monkeypatch.setattr(tool, "vit_gmacs_640x480", lambda output_dir: 7.0)  # no model built
    work, runs = tmp_path / "work", tmp_path / "runs"
    run = work / "iters8/castling-seed0"
    run.mkdir(parents=True)
    for name in ("model_final.pth", "model_0000003.pth"):
        (run / name).write_bytes(b"")
    (run / "branch_switch.json").write_text(json.dumps([
        {"iteration": 8, "branch_off": {"bbox": {"AP": 5.0, "AP50": 9.0}}, "branch_on": {"bbox": {"AP": 6.0, "AP50": 9.5}}}
    ]))
    (run / "metrics.json").write_text("\n".join(_branch_line(i, 1.0, {0: 0.1}, {0: 0.2}) for i in (1, 3, 5, 7)) + "\n")
    other_machine = dict(MACHINE, model_name="Where it ran")
    stored = _result("castling", 0, 1.0, 2.0, 3.0, schedule="iters8", own=8, total=8, extra_opts=["SEED", "0"])
    stored["machine"] = other_machine
    write_json_atomic(runs / "iters8/castling-seed0.json", stored)
    unfinished = runs / "iters8/softmax-seed0.json"
    write_json_atomic(unfinished, _result("softmax", 0, 1.0, 2.0, 3.0, schedule="iters8", own=8, total=8))
    before = unfinished.read_text()

    tool.run(["record", "--work-dir", str(work), "--results-dir", str(runs)])
    result = json.loads((runs / "iters8/castling-seed0.json").read_text())
    assert result["final"] == {"iteration": 8, "branch_off": {"AP": 5.0, "AP50": 9.0},
                               "branch_on": {"AP": 6.0, "AP50": 9.5}}
    assert result["branch_trajectory"]["iterations"] == [1, 3, 5, 7]
    assert result["branch_first_half"]["records"] == 2  # iterations 1 and 3 of 8
    assert result["machine"] == other_machine  # where it ran, not where it was recorded again
    assert result["extra_opts"] == ["SEED", "0"] and result["overrides"][-2:] == ["SEED", "0"]
    assert (run / "model_0000003.pth").is_file()  # nothing deleted
    assert unfinished.read_text() == before
    assert f"kept {unfinished}" in capsys.readouterr().out


def test_command_line_keeps_its_interface():
    parser = tool.argument_parser()
    args = parser.parse_args(["run", "--schedule", "curve", "--arms", "castling", "window", "--seeds", "0"])
    assert (args.schedule, args.arms, args.seeds, args.opts) == ("curve", ["castling", "window"], [0], [])
    assert (args.work_dir, args.results_dir) == (str(REPO / "output/benchmark_accuracy"),
                                                 str(REPO / "docs/benchmarks/bccd/runs"))
    args = parser.parse_args(["run", "--schedule", "iters8", "--arms", "softmax", "--seeds", "1", "--", "SEED", "3"])
    assert args.opts == ["--", "SEED", "3"]
    assert parser.parse_args(["run", "--schedule", "curve", "--arms", "softmax", "--seeds", "0",
                              "--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--schedule", "curve", "--arms", "softmax", "--seeds", "0", "--threads", "0"])
    assert parser.parse_args(["report"]).output_dir == str(REPO / "docs/benchmarks/bccd")
    helped = subprocess.run([sys.executable, "tools/benchmark_accuracy.py", "--help"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert helped.returncode == 0 and "{run,record,report}" in helped.stdout, helped.stderr[-2000:]


def _curve_run(arm, seed, aps, gmacs, ap_on=None, kept=None, own=2400, teacher=None):
    """A curve-schedule result evaluated every 600 of its own iterations (``aps``, branch off)."""
    evaluations = [{"iteration": 600 * (i + 1), "branch_off": {"AP": ap}} for i, ap in enumerate(aps)]
    return _result(arm, seed, aps[-1], 80.0, gmacs, schedule="curve", ap_on=ap_on, kept=kept, own=own,
                   total=2400, evaluations=evaluations, teacher=teacher)


def _readme_runs():
    return [
        _curve_run("softmax", 0, [40.0, 50.0, 52.0, 56.5], 13.22),
        _curve_run("softmax", 1, [41.0, 49.0, 53.0, 57.3], 13.22),
        _curve_run("window", 0, [39.0, 45.0, 50.0, 55.7], 10.53),
        # Gaps -0.3 and -0.5 -> −0.4 (a true minus); the same kept count in both seeds.
        _curve_run("castling", 0, [42.0, 50.0, 53.0, 57.5], 6.97, ap_on=57.2, kept=(0, 12)),
        _curve_run("castling", 1, [43.0, 51.0, 52.0, 56.9], 6.97, ap_on=56.4, kept=(0, 12)),
        # Evaluated branch on too, but trained without a branch: no gap.
        _curve_run("castling-no-branch", 0, [44.0, 49.0, 54.0, 57.4], 6.97, ap_on=57.3),
        _curve_run("castling-relative", 0, [38.0, 46.0, 54.0, 56.7], 6.97, ap_on=56.8, kept=(12, 12)),
        _curve_run("castling-relative", 1, [44.0, 48.0, 54.0, 57.5], 6.97, ap_on=57.6, kept=(11, 12)),
        # From softmax seed 0's checkpoint at 1200: its evaluations at 600 and 1200 lead the row.
        _curve_run("castling-switch", 0, [53.1, 56.8], 6.97, ap_on=57.0, kept=(12, 12), own=1200,
                   teacher="output/benchmark_accuracy/curve/softmax-seed0/model_0001199.pth"),
        _result("castling", 0, 1.0, 2.0, 7.0),  # iters600: not in the README's tables
    ]


_README_LABELS = {"window": "ViTDet layout", "castling": "the paper's recipe", "castling-switch": "from softmax"}


def test_readme_curve_table_rows_label_first_seeds_and_lead_a_switch_with_its_teacher():
    lines = readme_tables(_readme_runs(), list(tool.ARMS), _README_LABELS).splitlines()
    table = lines[1:lines.index("", 1)]
    assert table == [
        "| arm (curve schedule) | seed | AP @ 600 | 1200 | 1800 | 2400 | AP gap, branch on − off | ViT GMACs, 640×480 |",
        "|---|---|---|---|---|---|---|---|",
        "| softmax | 0 | 40.0 | 50.0 | 52.0 | 56.5 | — | 13.22 |",
        "| softmax | 1 | 41.0 | 49.0 | 53.0 | 57.3 | — | 13.22 |",
        "| window (ViTDet layout) | 0 | 39.0 | 45.0 | 50.0 | 55.7 | — | 10.53 |",
        "| castling (the paper's recipe) | 0 | 42.0 | 50.0 | 53.0 | 57.5 | −0.3 | 6.97 |",
        "| castling | 1 | 43.0 | 51.0 | 52.0 | 56.9 | −0.5 | 6.97 |",
        "| castling-no-branch | 0 | 44.0 | 49.0 | 54.0 | 57.4 | — | 6.97 |",
        "| castling-relative | 0 | 38.0 | 46.0 | 54.0 | 56.7 | +0.1 | 6.97 |",
        "| castling-relative | 1 | 44.0 | 48.0 | 54.0 | 57.5 | +0.1 | 6.97 |",
        "| castling-switch (from softmax) | 0 | 40.0 | 50.0 | 53.1 | 56.8 | +0.2 | 6.97 |",
    ]


def test_readme_summary_table_aggregates_seeds_as_the_readme_prints_them():
    lines = readme_tables(_readme_runs(), list(tool.ARMS), _README_LABELS).splitlines()
    assert lines[0] == "" and lines[-1] == ""  # blank lines inside the markers
    assert "At 2400 iterations, per arm (box AP with the branch off, as deployed: mean ± sample std over the" in lines
    table = lines[lines.index("| arm | seeds | box AP | AP gap, on − off | ViT GMACs, 640×480 | ÷ window "
                              "| blocks kept mass > 5 %, 1st half |"):-1]
    # 13.22 / 10.53 = 1.26; 6.97 / 10.53 = 0.66; std of 56.5 and 57.3 is 0.57.
    assert table[2:] == [
        "| softmax | 0, 1 | 56.9 ± 0.6 [56.5, 57.3] | — | 13.22 | 1.26 | — |",
        "| window (ViTDet layout) | 0 | 55.7 [55.7] | — | 10.53 | 1.00 | — |",
        "| castling (the paper's recipe) | 0, 1 | 57.2 ± 0.4 [57.5, 56.9] | −0.4 | 6.97 | 0.66 | 0/12 in each |",
        "| castling-no-branch | 0 | 57.4 [57.4] | — | 6.97 | 0.66 | — |",
        "| castling-relative | 0, 1 | 57.1 ± 0.6 [56.7, 57.5] | +0.1 | 6.97 | 0.66 | 12/12, 11/12 |",
        "| castling-switch (from softmax) | 0 | 56.8 [56.8] | +0.2 | 6.97 | 0.66 | 12/12 |",
    ]


def test_readme_tables_end_with_the_differences_to_the_reference_arms():
    lines = readme_tables(_readme_runs(), list(tool.ARMS), _README_LABELS, ("softmax", "window")).splitlines()
    assert lines[-1] == ""
    header = lines.index("| arm | seeds (n) | − softmax | − window |")
    assert lines[header - 2].startswith("Seed noise, pooled over the arms with two seeds or more: std 0.52 AP per run (3 ")
    # Pooled variance (0.32 + 0.18 + 0.32) / 3: std 0.523. castling-relative − softmax: 57.1 − 56.9,
    # se 0.523; window − softmax: 55.7 − 56.9, se 0.523 * sqrt(1.5) = 0.640.
    assert "| castling-relative | 2 | +0.2 ± 0.5 (+0.4 s.e.) | +1.4 ± 0.6 (+2.2 s.e.) |" in lines
    assert "| window | 1 | −1.2 ± 0.6 (−1.9 s.e.) | — |" in lines
    assert lines[header + 2:-1][0].startswith("| softmax | 2 | — |")


def test_readme_tables_need_the_curve_schedule():
    with pytest.raises(AblationError, match="'curve' schedule"):
        readme_tables([_result("castling", 0, 1.0, 2.0, 7.0)], list(tool.ARMS), {})


def test_marked_block_is_replaced_and_the_rest_kept_byte_for_byte():
    before = "# Title\r\nkept  \t\r\n"
    after = "\n  trailing text without newline"
    text = f"{before}{BEGIN_MARKER}\r\nold table\n\nold line\n{END_MARKER}{after}"
    assert replace_marked_block(text, "new\n", "X.md") == f"{before}{BEGIN_MARKER}\r\nnew\n{END_MARKER}{after}"


@pytest.mark.parametrize("text, message", [
    (f"a\n{END_MARKER}\n", f"X.md lacks the marker line {BEGIN_MARKER}"),
    (f"{BEGIN_MARKER}\nb\n", f"X.md lacks the marker line {END_MARKER}"),
    # A marker quoted in a sentence is not a marker line.
    (f"see {BEGIN_MARKER}\n{END_MARKER}\n", f"X.md lacks the marker line {BEGIN_MARKER}"),
    (f"{BEGIN_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n", f"X.md has 2 marker lines {BEGIN_MARKER}"),
    (f"{END_MARKER}\nb\n{BEGIN_MARKER}\n", f"X.md has the marker line {END_MARKER} before {BEGIN_MARKER}"),
])
def test_bad_markers_are_named(text, message):
    with pytest.raises(AblationError) as error:
        replace_marked_block(text, "new\n", "X.md")
    assert str(error.value).startswith(message)


def test_report_writes_the_readme_tables_between_the_markers(tmp_path, capsys):
    runs, out, readme = tmp_path / "runs", tmp_path / "report", tmp_path / "README.md"
    for result in _readme_runs():
        write_json_atomic(runs / result["schedule"] / f"{result['arm']}-seed{result['seed']}.json", result)
    before, after = "# Results\n\n", "\n![figure](accuracy.png)\n"
    readme.write_text(f"{before}{BEGIN_MARKER}\n| stale | table |\n{END_MARKER}{after}")
    tool.run(["report", "--results-dir", str(runs), "--output-dir", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(f"{before}{BEGIN_MARKER}\n\n| arm (curve schedule) |")
    assert text.endswith(f"|\n\n{END_MARKER}{after}")
    block = text[text.index(BEGIN_MARKER):text.index(END_MARKER)].splitlines()
    # The summary table, then the differences to the tool's reference arms, ending with the last arm.
    assert "| castling-switch (from the softmax twin at half the schedule) | 0 | 56.8 [56.8] | +0.2 | 6.97 | 0.66 | 12/12 |" in block
    assert "| arm | seeds (n) | − softmax | − window | − castling-relative |" in block
    assert block[-2].startswith("| castling-switch | 1 | ")
    assert "| stale | table |" not in text
    assert f"| castling ({tool.README_LABELS['castling']}) | 0 | 42.0 |" in text
    assert f"{readme}: tables rewritten" in capsys.readouterr().out


def test_report_with_unmarked_readme_fails_before_writing_anything(tmp_path):
    runs, out, readme = tmp_path / "runs", tmp_path / "report", tmp_path / "README.md"
    for result in _readme_runs():
        write_json_atomic(runs / result["schedule"] / f"{result['arm']}-seed{result['seed']}.json", result)
    readme.write_text(f"{BEGIN_MARKER}\nno end marker\n")
    with pytest.raises(SystemExit) as exited:
        tool.run(["report", "--results-dir", str(runs), "--output-dir", str(out), "--readme", str(readme)])
    assert str(readme) in str(exited.value) and END_MARKER in str(exited.value)
    assert not out.exists() and readme.read_text() == f"{BEGIN_MARKER}\nno end marker\n"


def test_branch_gap_counts_only_runs_trained_with_a_branch_in_both_tables():
    # Trained without a branch, evaluated both ways: no gap, in results.md and the README alike.
    no_branch = _result("castling-no-branch", 0, 57.5, 80.0, 7.0, ap_on=57.4)
    with_branch = [_result("castling", 0, 57.5, 80.0, 7.0, ap_on=57.2, kept=(0, 12)),
                   _result("castling", 1, 58.0, 80.0, 7.0, ap_on=57.6, kept=(0, 12))]
    assert branch_gap_mean([no_branch]) is None
    assert summarize_arm([no_branch])["gap_mean"] is None
    assert branch_gap_mean(with_branch) == pytest.approx(-0.35)
    assert summarize_arm(with_branch)["gap_mean"] == pytest.approx(-0.35)
