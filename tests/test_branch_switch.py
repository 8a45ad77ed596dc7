"""The switch hook with one and several test sets: Detectron2's standard keys, the results kept
for TEST.EXPECTED_RESULTS, a table and GFLOPs per test set; --softmax-branch outside --eval-only."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from castling_det.data import make_shapes_dataset
from castling_det.engine import SoftmaxBranchSwitch, format_switch_table
from castling_det.engine.cli import _run_then_close_process_group, argument_parser, eval_branch_states

REPO = Path(__file__).resolve().parents[1]


def _fake_evaluation(dataset_names):
    """An ``evaluate`` returning what DefaultTrainer.test does, with AP 30 (branch on) and 20
    (off) plus the test set's index, and a GFLOP counter that names its test set."""
    def evaluate(model):
        on = any(m.branch_at_inference for m in model.modules() if hasattr(m, "branch_at_inference"))
        per_set = {
            name: {"bbox": {"AP": (30.0 if on else 20.0) + i, "AP50": 50.0 + i}}
            for i, name in enumerate(dataset_names)
        }
        return per_set if len(dataset_names) > 1 else per_set[dataset_names[0]]

    def count_gflops(model, dataset_name):
        return {"model": 1.0 + dataset_names.index(dataset_name), "backbone": 0.5}

    return evaluate, count_gflops


def _run_switch(make_detector_cfg, tmp_path, dataset_names):
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    evaluate, count_gflops = _fake_evaluation(dataset_names)
    hook = SoftmaxBranchSwitch(
        model=model, eval_period=0, evaluate=lambda: evaluate(model), count_gflops=count_gflops,
        output_dir=str(tmp_path), dataset_names=dataset_names,
    )
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=9, max_iter=10, storage=storage)
        hook._do_eval()
        latest = {key: value for key, (value, _) in storage.latest().items()}
    return hook, latest


def test_one_test_set_writes_detectron2_keys_for_the_deployed_model(make_detector_cfg, tmp_path):
    hook, latest = _run_switch(make_detector_cfg, tmp_path, ["val"])
    # Detectron2's own keys (what BestCheckpointer(val_metric="bbox/AP") reads) hold the deployed AP
    assert latest["bbox/AP"] == 20.0 and latest["bbox/AP50"] == 50.0
    assert latest["branch_off/bbox/AP"] == 20.0 and latest["branch_on/bbox/AP"] == 30.0
    assert latest["branch_off/gflops/model"] == 1.0
    assert "gflops/model" not in latest  # GFLOPs only under the branch states
    # DefaultTrainer.train checks TEST.EXPECTED_RESULTS against this
    assert hook.trainer._last_eval_results == {"bbox": {"AP": 20.0, "AP50": 50.0}}
    record = json.loads((tmp_path / "branch_switch.json").read_text())[-1]
    assert record["branch_off"]["bbox"]["AP"] == 20.0 and record["iteration"] == 10


def test_a_resumed_run_evaluates_its_checkpoint_when_that_evaluation_is_missing(make_detector_cfg, tmp_path):
    """A session killed during the evaluation at 600 resumes from the checkpoint of 600: the hook
    evaluates it before training goes on, recorded as the uninterrupted run records it."""
    model = build_model(make_detector_cfg("GeneralizedRCNN"))
    evaluate, count_gflops = _fake_evaluation(["val"])
    calls = []
    hook = SoftmaxBranchSwitch(
        model=model, eval_period=300, evaluate=lambda: calls.append(1) or evaluate(model),
        count_gflops=count_gflops, output_dir=str(tmp_path), dataset_names=["val"],
    )
    (tmp_path / "branch_switch.json").write_text(json.dumps([{"iteration": 300}]))

    def resume_at(start_iter, max_iter=2400):
        with EventStorage(start_iter) as storage:
            hook.trainer = SimpleNamespace(iter=start_iter, max_iter=max_iter, storage=storage)
            hook.before_train()
            assert storage.iter == start_iter  # restored for the training steps
            return storage.history("bbox/AP").values() if "bbox/AP" in storage.histories() else []

    assert resume_at(600) == [(20.0, 599)]  # stored where an uninterrupted run stores it
    assert len(calls) == 2  # branch on and off
    records = json.loads((tmp_path / "branch_switch.json").read_text())
    assert [r["iteration"] for r in records] == [300, 600]
    # evaluated already, not an evaluation point, the start, or the end (after_train evaluates)
    for start_iter, max_iter in ((600, 2400), (300, 2400), (450, 2400), (0, 2400), (900, 900)):
        assert resume_at(start_iter, max_iter) == []
    assert len(calls) == 2


def test_two_test_sets_get_a_table_keys_and_gflops_each(make_detector_cfg, tmp_path):
    hook, latest = _run_switch(make_detector_cfg, tmp_path, ["val", "val2"])
    assert latest["val/bbox/AP"] == 20.0 and latest["val2/bbox/AP"] == 21.0
    assert latest["branch_on/val2/bbox/AP"] == 31.0
    assert latest["branch_off/val2/gflops/model"] == 2.0  # counted on its own test set
    assert hook.trainer._last_eval_results == {
        "val": {"bbox": {"AP": 20.0, "AP50": 50.0}}, "val2": {"bbox": {"AP": 21.0, "AP50": 51.0}}
    }
    table = format_switch_table(hook.last_results)
    val_table, val2_table = table.split("\n\nval2:\n")
    assert val_table.startswith("val:\n")
    # columns: bbox AP, bbox AP50, model GFLOPs, backbone GFLOPs
    assert _rows(val_table) == {"on": [30.0, 50.0, 1.0, 0.5], "off": [20.0, 50.0, 1.0, 0.5]}
    assert _rows(val2_table) == {"on": [31.0, 51.0, 2.0, 0.5], "off": [21.0, 51.0, 2.0, 0.5]}


def _rows(table):
    """{state: numbers} of a Markdown switch table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("on", "off"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_softmax_branch_needs_eval_only():
    parser = argument_parser()
    assert eval_branch_states(parser.parse_args([])) == ("off",)
    both = parser.parse_args(["--eval-only", "--softmax-branch", "both"])
    assert eval_branch_states(both) == ("on", "off")
    with pytest.raises(SystemExit, match="applies to --eval-only"):
        eval_branch_states(parser.parse_args(["--softmax-branch", "on"]))


def test_worker_closes_its_process_group_after_main(tmp_path):
    """A worker that exits with Gloo's group still open can abort at shutdown (SIGABRT)."""
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert _run_then_close_process_group(lambda args: args * 2, 21) == 42
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_training_with_two_test_sets_and_expected_results(tmp_path):
    """tools/train_net.py with two test sets evaluates both (no KeyError), and with one test set
    TEST.EXPECTED_RESULTS is checked against the deployed model's results."""
    splits = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, seed=4)
    (train_json, train_dir), (val_json, val_dir) = splits["train"], splits["val"]
    data = [
        "--register-coco", "s_train", train_json, train_dir,
        "--register-coco", "s_val", val_json, val_dir,
        "--register-coco", "s_val2", val_json, val_dir,
    ]
    common = [
        "--config-file", REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml", *data,
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.CASTLING.DEPTH", "1",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "TEST.FLOPS_NUM_IMAGES", "1", "SOLVER.MAX_ITER", "2",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TRAIN", '("s_train",)',
    ]

    def train(output_dir, *opts):
        cmd = [sys.executable, REPO / "tools/train_net.py", *common, "OUTPUT_DIR", output_dir, *opts]
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600)

    two = train(tmp_path / "two", "DATASETS.TEST", '("s_val", "s_val2")')
    assert two.returncode == 0, two.stderr[-3000:]
    assert "s_val:\n|" in two.stdout and "s_val2:\n|" in two.stdout
    records = (tmp_path / "two/metrics.json").read_text().splitlines()
    keys = set().union(*(json.loads(line) for line in records))
    assert {"s_val/bbox/AP", "s_val2/bbox/AP", "branch_on/s_val2/bbox/AP"} <= keys

    # AP lies in [0, 100]: expected 50 +- 51 always holds, expected -10 +- 1 never does
    expect = ("DATASETS.TEST", '("s_val",)', "TEST.EXPECTED_RESULTS")
    holds = train(tmp_path / "holds", *expect, "[['bbox', 'AP', 50.0, 51.0]]")
    assert holds.returncode == 0, holds.stderr[-3000:]
    fails = train(tmp_path / "fails", *expect, "[['bbox', 'AP', -10.0, 1.0]]")
    assert fails.returncode != 0 and "verification failed" in (fails.stdout + fails.stderr).lower()
