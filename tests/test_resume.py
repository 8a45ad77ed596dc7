"""Crash safety (part of issue #7): the planned training batches, a run killed with SIGKILL and
resumed, and a kill while a checkpoint is being written."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from castling_det import load_castling_config
from castling_det.data import make_shapes_dataset
from castling_det.data.train_loader import BatchPlan, ResumableTrainLoader, _PlannedBatches
from castling_det.engine import CastlingCheckpointer

REPO = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"
# Castling-ViT-Ti with one block on 64-pixel images, no test set; two loader workers, so that
# their share of the batches is exercised too.
RUN_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "2", "MODEL.CASTLING.DEPTH", "1",
    "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MAX_SIZE_TRAIN", "64", "DATASETS.TEST", "()",
    "TEST.FLOPS_NUM_IMAGES", "0", "SOLVER.WARMUP_ITERS", "5", "SOLVER.MAX_ITER", "30",
    "SOLVER.CHECKPOINT_PERIOD", "10", "SEED", "11",
]


# --------------------------------------------------------------------------------------------
# The batch plan and the loader
# --------------------------------------------------------------------------------------------
def test_batch_plan_covers_each_epoch_in_whole_orientation_groups():
    groups = [0] * 12 + [1] * 8
    plan = BatchPlan(groups, batch_size=4, seed=5)
    assert plan.batches_per_epoch == 5
    for epoch in range(2):
        batches = [plan.batch(epoch * 5 + i) for i in range(5)]
        assert sorted(sum(batches, [])) == list(range(20))  # every record once per epoch
        assert all(len({groups[j] for j in batch}) == 1 for batch in batches)
    assert [plan.batch(i) for i in range(5)] != [plan.batch(i) for i in range(5, 10)]  # reshuffled


def test_batch_plan_depends_on_the_seed_and_the_iteration_only():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1]
    first, again, other = (BatchPlan(groups, 2, seed) for seed in (5, 5, 6))
    late = [again.batch(i) for i in range(7, 12)]  # asked in another order than first
    assert [first.batch(i) for i in range(12)][7:] == late
    assert [first.batch(i) for i in range(12)] != [other.batch(i) for i in range(12)]
    # Leftovers of both groups (5 and 4 records) make one mixed batch; the 9th record waits.
    assert first.batches_per_epoch == 4


def test_batch_plan_names_a_batch_larger_than_the_data_set():
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH=8 .* \(3 images\)"):
        BatchPlan([0, 0, 1], batch_size=8, seed=0)


def _records(count):
    return [{"file_name": f"{i}.png", "width": 40 + i % 3 * 20, "height": 50, "id": i} for i in range(count)]


def _augmenting_mapper(record):
    """A mapper drawing from NumPy's global RNG, as Detectron2's augmentations do."""
    return {"id": record["id"], "flip": bool(np.random.rand() < 0.5), "scale": int(np.random.randint(1000))}


def _take(loader, count):
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def test_loader_replays_the_same_batches_from_any_iteration_and_any_worker_count():
    def loader(workers):
        return ResumableTrainLoader(
            _records(11), _augmenting_mapper, total_batch_size=3, seed=7, num_workers=workers
        )

    reference = _take(loader(0), 9)
    resumed = loader(2)
    resumed.start_at(4)
    assert _take(resumed, 5) == reference[4:]
    assert len({item["scale"] for batch in reference for item in batch}) > 20  # augmentations vary
    # A draw does not disturb the caller's own NumPy stream.
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    _take(loader(0), 1)
    assert np.random.rand() == expected


def test_processes_split_each_planned_batch_between_them():
    plan = BatchPlan([0] * 12, batch_size=4, seed=3)
    shares = [
        next(iter(_PlannedBatches(_records(12), _augmenting_mapper, plan, 5, rank, world_size=2)))
        for rank in range(2)
    ]
    assert [item["id"] for share in shares for item in share] == plan.batch(5)


def test_a_mapper_that_drops_a_record_is_named():
    loader = ResumableTrainLoader(_records(4), lambda record: None, total_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"returned None for training record \d \(\d.png\)"):
        _take(loader, 1)


# --------------------------------------------------------------------------------------------
# Killed runs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    splits = make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=9, num_val=2, image_size=64, seed=4
    )
    train_json, train_dir = splits["train"]
    return ["--register-coco", "shapes_train", str(train_json), str(train_dir)]


def _train_net(shapes, output_dir, *extra_args, kill_code="", opts=()):
    """Run tools/train_net.py in a fresh process, after ``kill_code`` (which may patch it to
    SIGKILL itself); ``opts`` override RUN_OPTS."""
    argv = ["train_net.py", "--config-file", str(SHAPES_CONFIG), *shapes, *extra_args,
            "OUTPUT_DIR", str(output_dir), *RUN_OPTS, *opts]
    script = (
        "import runpy, sys, os, signal\n"
        f"sys.argv = {argv!r}\n"
        f"{kill_code}\n"
        f"runpy.run_path({str(REPO / 'tools' / 'train_net.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def _kill_at(iteration):
    """Code that makes the trainer SIGKILL its process when it reaches ``iteration``."""
    return f"""
from castling_det.engine import CastlingTrainer
_run_step = CastlingTrainer.run_step
def run_step(self):
    if self.iter == {iteration}:
        os.kill(os.getpid(), signal.SIGKILL)
    _run_step(self)
CastlingTrainer.run_step = run_step
"""


def _last_record_per_iteration(output_dir):
    """metrics.json as {iteration: record}, timings left out; a resumed run appends, so the last
    record of an iteration wins."""
    records = {}
    for line in (output_dir / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        records[record["iteration"]] = {
            key: value for key, value in record.items() if "time" not in key and key != "eta_seconds"
        }
    return records


def test_a_run_killed_and_resumed_ends_as_an_uninterrupted_one(shapes, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = _train_net(shapes, whole)
    assert result.returncode == 0, result.stderr[-4000:]

    result = _train_net(shapes, killed, kill_code=_kill_at(25))
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    assert (killed / "last_checkpoint").read_text() == "model_0000019.pth"
    assert not (killed / "model_final.pth").exists()

    result = _train_net(shapes, killed, "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Starting training from iteration 20" in (killed / "log.txt").read_text()

    final = [torch.load(run / "model_final.pth", weights_only=True) for run in (whole, killed)]
    assert final[0]["iteration"] == final[1]["iteration"] == 29
    for key, tensor in final[0]["model"].items():
        torch.testing.assert_close(final[1]["model"][key], tensor, atol=1e-6, rtol=0, msg=key)
    optimizers = [checkpoint["trainer"]["_trainer"]["optimizer"]["state"] for checkpoint in final]
    assert optimizers[0] and optimizers[0].keys() == optimizers[1].keys()
    for index, state in optimizers[0].items():  # AdamW's moments
        for name, tensor in state.items():
            torch.testing.assert_close(optimizers[1][index][name], tensor, atol=1e-6, rtol=0)
    schedulers = [checkpoint["trainer"]["hooks"]["LRScheduler"] for checkpoint in final]
    assert schedulers[0]["last_epoch"] == schedulers[1]["last_epoch"] == 30

    metrics = [_last_record_per_iteration(run) for run in (whole, killed)]
    # Written at 19 and 29; the branch's statistics stop at 23, when its scale reaches 0.
    assert sorted(metrics[0]) == sorted(metrics[1]) == [19, 23, 29]
    assert "total_loss" in metrics[0][29]  # medians over iterations 10-29, across the restart
    for iteration, record in metrics[0].items():
        assert record.keys() == metrics[1][iteration].keys()
        assert metrics[1][iteration] == pytest.approx(record, abs=1e-6, rel=0), iteration


def _seed_of(checkpoint_path):
    return torch.load(checkpoint_path, weights_only=True)["trainer"]["hooks"]["IterationSeeding"]["seed"]


def test_a_drawn_seed_is_kept_on_resume(shapes, tmp_path):
    """README: "`SEED: -1` draws one and a resumed run keeps it". A SEED -1 run killed at
    iteration 8 and resumed keeps the seed its checkpoint holds, and ends with the weights of an
    uninterrupted run given that seed. All three start from the same saved weights, since the
    drawn seed would otherwise decide the initialisation too."""
    init = tmp_path / "init.pth"
    cfg = load_castling_config(str(SHAPES_CONFIG), RUN_OPTS)
    torch.save({"model": build_model(cfg).state_dict()}, init)
    short = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "5", "MODEL.WEIGHTS", str(init)]
    drawn, given = tmp_path / "drawn", tmp_path / "given"

    result = _train_net(shapes, drawn, kill_code=_kill_at(8), opts=[*short, "SEED", "-1"])
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    assert (drawn / "last_checkpoint").read_text() == "model_0000004.pth"
    seed = _seed_of(drawn / "model_0000004.pth")
    result = _train_net(shapes, drawn, "--resume", opts=[*short, "SEED", "-1"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Starting training from iteration 5" in (drawn / "log.txt").read_text()
    assert _seed_of(drawn / "model_final.pth") == seed

    result = _train_net(shapes, given, opts=[*short, "SEED", str(seed)])
    assert result.returncode == 0, result.stderr[-4000:]
    final = [torch.load(run / "model_final.pth", weights_only=True)["model"] for run in (given, drawn)]
    for key, tensor in final[0].items():
        torch.testing.assert_close(final[1][key], tensor, atol=1e-6, rtol=0, msg=key)


KILL_WHILE_SAVING_MODEL_FINAL = """
import torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if os.path.basename(getattr(f, 'name', '')).startswith('model_final.pth'):
        f.write(b'half a checkpoint')
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    _save(obj, f, *args, **kwargs)
torch.save = save
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_tagged_and_loadable(shapes, tmp_path):
    result = _train_net(shapes, tmp_path, kill_code=KILL_WHILE_SAVING_MODEL_FINAL)
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    assert not (tmp_path / "model_final.pth").exists()
    assert [path.name for path in tmp_path.glob("model_final.pth.tmp-*")]  # the half-written file
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000029.pth"
    checkpoint = torch.load(tmp_path / "model_0000029.pth", weights_only=True)
    assert checkpoint["iteration"] == 29


def test_a_failed_save_leaves_no_file_behind(tmp_path, monkeypatch):
    checkpointer = CastlingCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("good")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("bad")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good.pth", "last_checkpoint"]
    assert checkpointer.get_checkpoint_file().endswith("good.pth")
