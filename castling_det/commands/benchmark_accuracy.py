"""BCCD accuracy ablation: Castling-ViT-Ti Faster R-CNN arms trained and evaluated, resumably.

``run`` trains and evaluates each (arm, seed) of a schedule with tools/train_net.py, one after the
other, on configs/BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml; ``record`` rewrites the stored
results from their runs' folders without training; ``report`` turns the stored results into
Markdown tables and two figures. A run trains in ``{work-dir}/{schedule}/{arm}-seed{s}`` and, when
it ends, stores ``{results-dir}/{schedule}/{arm}-seed{s}.json``. Calling ``run`` again skips stored
runs, resumes a killed one from its ``last_checkpoint`` and only records one that finished
unrecorded (e.g. started by hand), so a series spans sessions. It needs a checkout of the
repository (tools/train_net.py, configs/), whose root is the default base of every folder.

Schedules (castling_det/analysis/accuracy_runs.py): ``curve`` (2400 iterations, evaluated every
300) and ``iters{S}`` (S a multiple of 8). Arms: see ARMS below or ``run --help``.

The result file holds: arm, description, schedule, seed, overrides (all passed to train_net),
extra_opts (those given on the command line), total_iterations (a switching arm's teacher
included), own_iterations, teacher_checkpoint, evaluations ({iteration, branch_off: {AP, AP50},
branch_on: ...}), final, vit_gmacs_640x480 (ViT multiply-adds on one 640x480 image, branch off),
wall_seconds and segments (train + eval time, summed over the runner's segments; runner_time.json
in the run's folder is updated every 30 s), segment_threads (each segment's ``--threads``), untimed_prior_run, branch_first_half (median kept mass
and share per castling block over the first half of training), branch_trajectory (kept mass and
share per block, branch scale and L1 weight, at up to 100 logged iterations; null without a
branch; format in castling_det.analysis.branch_stats.branch_trajectory), machine and commit.

``record`` rewrites every stored result whose run's folder holds the finished run, in the current
format (e.g. adding branch_trajectory to a result stored before it existed); it keeps the stored
machine and extra_opts, trains nothing and deletes nothing. ``report`` writes results.md (the
tables, the softmax branch's included), accuracy.png and branch.png (kept mass and share per block
against the iteration, for every run with a branch); with ``--readme``, it also rewrites the
``curve`` schedule's two tables in that file, between its lines ``<!-- bccd-accuracy-tables:begin -->``
and ``<!-- bccd-accuracy-tables:end -->`` (README_LABELS below names some arms there).

Relative paths are taken from the current directory; train_net runs in the repository root.

Usage:
    python tools/benchmark_accuracy.py run --schedule iters600 --arms softmax window castling \\
        --seeds 0 1 2 [--data-root DIR] [-- KEY VALUE ...]
    python tools/benchmark_accuracy.py record [--work-dir output/benchmark_accuracy] \\
        [--results-dir docs/benchmarks/bccd/runs]
    python tools/benchmark_accuracy.py report [--results-dir docs/benchmarks/bccd/runs] \\
        [--output-dir docs/benchmarks/bccd] [--readme README.md]

Installed with pip (in a checkout, editable), the same tool is the ``castling-benchmark-accuracy``
command. Config overrides after the options are added to every run; put ``--`` before them when
they follow ``--arms`` or ``--seeds``.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import build_model

from castling_det import load_castling_config, softmax_branch
from castling_det.analysis import branch_trajectory, count_gflops, first_half_branch_stats
from castling_det.analysis.accuracy_figures import plot_accuracy, plot_branch
from castling_det.analysis.accuracy_runs import (
    RUN_TIME_FILE,
    SWITCH_FILE,
    AblationError,
    Arm,
    RunPlan,
    build_result,
    check_teacher,
    load_results,
    load_run_time,
    parse_schedule,
    plan_run,
    prune_checkpoints,
    reduce_evaluations,
    results_markdown,
    run_decision,
    run_finished,
    write_json_atomic,
    write_text_atomic,
)
from castling_det.analysis.readme_tables import readme_tables, replace_marked_block

# The checkout holding this package (castling_det/commands/ is two levels below it).
REPO = Path(__file__).resolve().parents[2]
# Relative to REPO, where train_net runs: the commands keep the short form the curve run was started with.
TRAIN_NET = "tools/train_net.py"
CONFIG = "configs/BCCD/faster_rcnn_castling_vit_ti_fpn_bccd.yaml"
CLASSES = "RBC,WBC,Platelets"
RESULTS_DIR = "docs/benchmarks/bccd/runs"
# How often the running subprocess's wall time is saved: a killed session loses at most this.
TIME_SAVE_SECONDS = 30.0

ATTN_KINDS = "MODEL.CASTLING.ATTN_KINDS"
GLOBAL_BLOCKS = (2, 5, 8, 11)  # ViTDet's layout of a 12-block ViT


def _kinds(global_kind: str) -> str:
    """ATTN_KINDS (a JSON list) of 12 blocks: ``global_kind`` at blocks 2, 5, 8, 11, window elsewhere."""
    return json.dumps([global_kind if i in GLOBAL_BLOCKS else "window" for i in range(12)])


def _recipe(*overrides: Sequence[str]) -> Tuple[str, ...]:
    """Flat yacs key/value lists merged into one: a later value of a key replaces the earlier one
    in place, so each key appears once in an arm's stored overrides."""
    merged: Dict[str, str] = {}
    for pairs in overrides:
        merged.update(zip(pairs[0::2], pairs[1::2]))
    return tuple(item for pair in merged.items() for item in pair)


# The paper's recipe, pinned key by key so that the arms keep their meaning whatever the configs'
# defaults become: 9x1 convolution along the token sequence, absolute mask 0.02, L1 penalty 1.
_CASTLING = (
    ATTN_KINDS, '["castling"]',
    "MODEL.CASTLING.CONV_KIND", "seq", "MODEL.CASTLING.CONV_KERNEL_SIZE", "9",
    "MODEL.CASTLING.LEARN_LINEAR_WEIGHT", "False",
    "MODEL.CASTLING.BRANCH.MASK", "absolute", "MODEL.CASTLING.BRANCH.THRESHOLD", "0.02",
    "MODEL.CASTLING.BRANCH.AS_SUM", "False", "MODEL.CASTLING.BRANCH.L1_WEIGHT", "1.0",
)
# A relative or top-k mask keeps mass at any softmax: the L1 penalty could only flatten it, so the
# branch is retired by the scale annealing alone.
_NO_L1 = ("MODEL.CASTLING.BRANCH.L1_WEIGHT", "0.0")
_RELATIVE = (
    "MODEL.CASTLING.BRANCH.MASK", "relative", "MODEL.CASTLING.BRANCH.RELATIVE_THRESHOLD", "1.0", *_NO_L1
)
# The configs' default recipe: the paper's with the relative mask and no L1 (arm castling-relative).
_DEFAULT = _recipe(_CASTLING, _RELATIVE)

# name -> Arm(one-line description, yacs overrides, arm switched from at half the schedule).
ARMS: Dict[str, Arm] = {
    "softmax": Arm("global softmax attention in every block", (ATTN_KINDS, '["softmax"]')),
    "window": Arm("window attention, global softmax at blocks 2, 5, 8, 11", (ATTN_KINDS, _kinds("softmax"))),
    "castling": Arm("linear-angular, seq 9x1 conv, absolute mask 0.02 (the paper's recipe)", _CASTLING),
    "castling-no-branch": Arm(
        "castling without the softmax branch", _recipe(_CASTLING, ("MODEL.CASTLING.BRANCH.ENABLED", "False"))
    ),
    "castling-relative": Arm("castling, relative mask (A >= 1/N), no L1", _DEFAULT),
    "castling-relative-sum": Arm(
        "castling-relative with the branch times N (a sum like the linear term)",
        _recipe(_DEFAULT, ("MODEL.CASTLING.BRANCH.AS_SUM", "True")),
    ),
    "castling-topk": Arm(
        "castling, top-32 mask, no L1",
        _recipe(_CASTLING, ("MODEL.CASTLING.BRANCH.MASK", "topk", "MODEL.CASTLING.BRANCH.TOPK", "32"), _NO_L1),
    ),
    **{
        f"castling-grid{k}": Arm(
            f"castling, {k}x{k} grid conv on v",
            _recipe(_CASTLING, ("MODEL.CASTLING.CONV_KIND", "grid", "MODEL.CASTLING.CONV_KERNEL_SIZE", str(k))),
        )
        for k in (3, 5, 7)
    },
    # On the default recipe, so that it is measured against the arm with three seeds and, if it
    # wins, is the best combination itself.
    "castling-learned-weight": Arm(
        "castling-relative with a learned per-head weight of the linear term",
        _recipe(_DEFAULT, ("MODEL.CASTLING.LEARN_LINEAR_WEIGHT", "True")),
    ),
    "castling-switch": Arm(
        "castling from the softmax twin at S/2, attention transfer, relative mask",
        _recipe(_DEFAULT, ("MODEL.CASTLING.TRANSFER.LOSS_WEIGHT", "1.0", "MODEL.CASTLING.TRANSFER.END", "0.25")),
        switch_from="softmax",
    ),
    # The default recipe in ViTDet's layout: what a user of the configs would get from it.
    "hybrid": Arm(
        "window attention, castling-relative at blocks 2, 5, 8, 11 (linear everywhere)",
        _recipe(_DEFAULT, (ATTN_KINDS, _kinds("castling"))),
    ),
}

# A few words after an arm's name in the README's tables (the curve schedule's), for the arms its
# text discusses by role.
README_LABELS: Dict[str, str] = {
    "window": "ViTDet layout",
    "castling": "the paper's recipe",
    "castling-no-branch": "the branch never on",
    "castling-relative": "the default: relative mask 1/N, no L1",
    **{f"castling-grid{k}": f"{k}×{k} conv on the token grid" for k in (3, 5, 7)},
    "castling-learned-weight": "the default recipe plus a learned per-head weight of the linear term",
    "castling-switch": "from the softmax twin at half the schedule",
    "hybrid": "ViTDet layout, its 4 global blocks linear-angular",
}


# The arms every other arm is compared with against the seed noise: the two twins and the
# configs' default recipe.
REFERENCE_ARMS = ("softmax", "window", "castling-relative")


def train_command(data_root: str, overrides: List[str], resume: bool) -> List[str]:
    """The train_net command of one run (run in REPO); ``--resume`` continues a killed run."""
    return [
        sys.executable, TRAIN_NET, "--config-file", CONFIG,
        "--register-voc", "bccd_train", data_root, "train", CLASSES,
        "--register-voc", "bccd_val", data_root, "val", CLASSES,
        *(["--resume"] if resume else []),
        *overrides,
    ]


def check_data_root(data_root: str) -> None:
    """Raise :class:`AblationError` unless ``data_root`` holds BCCD's train and val splits."""
    for split in ("train", "val"):
        if not (Path(data_root) / "ImageSets/Main" / f"{split}.txt").is_file():
            raise AblationError(
                f"BCCD not found under --data-root {data_root}: {split} split "
                f"ImageSets/Main/{split}.txt is missing"
            )


def repo_path(path: str) -> str:
    """``path`` (relative to the current directory) as train_net, run in REPO, must see it:
    relative to REPO when inside it (the short form the curve run was started with), absolute
    otherwise."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else str(absolute)


def running_trainer(output_dir: Path) -> Optional[int]:
    """The pid of a live train_net process writing ``output_dir`` (read from /proc), if any: a
    run started by hand, or orphaned by a killed runner, must not be trained twice at once."""
    target = (REPO / output_dir).resolve()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
            cwd = os.readlink(proc / "cwd")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if not any(a.endswith("train_net.py") for a in argv) or "OUTPUT_DIR" not in argv[:-1]:
            continue
        if (Path(cwd) / argv[argv.index("OUTPUT_DIR") + 1]).resolve() == target:
            return int(proc.name)
    return None


def machine_info() -> Dict:
    """CPU model (lscpu), logical CPUs, and whether AVX-512F and AMX tiles are available."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in
        (line.partition(":") for line in lscpu.stdout.splitlines())
    )
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return {
        "model_name": fields.get("Model name", "unknown"),
        "cpus": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "amx_tile": "amx_tile" in flags,
    }


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it."""
    def git(*args):
        # --no-optional-locks: do not refresh the index under another git user's feet.
        return subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")


def vit_gmacs_640x480(output_dir: Path) -> float:
    """GMACs (fvcore multiply-adds) of ``backbone.net`` on one 640x480 image, softmax branch off,
    on a model built from the run's saved config (weights do not change the count)."""
    cfg = load_castling_config(str(output_dir / "config.yaml"), device="cpu")
    model = build_model(cfg)
    image = {"image": torch.zeros(3, 480, 640), "height": 480, "width": 640}
    with softmax_branch(model, False):
        return count_gflops(model, [image], modules=("backbone.net",))["backbone.net"]


def train(plan: RunPlan, data_root: str, resume: bool, threads: int) -> None:
    """Run train_net for ``plan`` with ``threads`` intra-op threads, saving the segment's wall
    time to runner_time.json every TIME_SAVE_SECONDS and when it ends (also when the runner is
    interrupted, which ends it)."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    run_time = load_run_time(plan.output_dir)
    segment = {"commit": git_commit(), "seconds": 0.0, "threads": threads}
    run_time["segments"].append(segment)
    time_file = plan.output_dir / RUN_TIME_FILE
    write_json_atomic(time_file, run_time)
    start = time.monotonic()
    process = subprocess.Popen(
        train_command(data_root, plan.overrides, resume),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    try:
        while True:
            try:
                return_code = process.wait(timeout=TIME_SAVE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                segment["seconds"] = time.monotonic() - start
                write_json_atomic(time_file, run_time)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()
        segment["seconds"] = time.monotonic() - start
        write_json_atomic(time_file, run_time)
    if return_code != 0:
        raise AblationError(
            f"train_net failed (exit {return_code}) for arm {plan.arm!r} seed {plan.seed}; "
            f"see {plan.output_dir / 'log.txt'}"
        )


def record(plan: RunPlan, machine: Dict, prune: bool = True) -> None:
    """Store the result of a finished run, then (``prune``) delete its intermediate checkpoints."""
    evaluations = reduce_evaluations(json.loads((plan.output_dir / SWITCH_FILE).read_text()))
    metrics = plan.output_dir / "metrics.json"
    result = build_result(
        plan,
        evaluations,
        vit_gmacs_640x480(plan.output_dir),
        load_run_time(plan.output_dir),
        first_half_branch_stats(metrics, plan.own_iterations),
        branch_trajectory(metrics),
        machine,
    )
    write_json_atomic(plan.result_file, result)
    deleted = prune_checkpoints(plan.output_dir, plan.keep_checkpoint) if prune else []
    final = result["final"]
    print(
        f"[benchmark_accuracy] stored {plan.result_file}: box AP {final['branch_off']['AP']:.1f} "
        f"(branch off); deleted {len(deleted)} intermediate checkpoint(s)",
        flush=True,
    )


def run_series(args) -> None:
    """The ``run`` subcommand: every (arm, seed) in the order given, each skipped, collected,
    resumed or started (see castling_det.analysis.accuracy_runs.run_decision)."""
    schedule = parse_schedule(args.schedule)
    if not (REPO / TRAIN_NET).is_file():
        raise AblationError(f"{REPO / TRAIN_NET} not found: run needs a checkout of the repository")
    check_data_root(args.data_root)
    data_root, work_dir, results_dir = map(repo_path, (args.data_root, args.work_dir, args.results_dir))
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    os.chdir(REPO)  # every path below is relative to REPO, as train_net sees it
    # Plan everything first: an unknown arm stops the series before any training.
    plans = [
        plan_run(ARMS, arm, schedule, seed, work_dir, results_dir, opts)
        for arm in args.arms for seed in args.seeds
    ]
    machine = machine_info()
    for plan in plans:
        decision = run_decision(plan)
        label = f"{plan.schedule} {plan.arm} seed {plan.seed}"
        if decision == "skip":
            print(f"[benchmark_accuracy] skip {label}: {plan.result_file} exists", flush=True)
            continue
        pid = running_trainer(plan.output_dir)
        if pid is not None:
            raise AblationError(f"{label}: train_net (pid {pid}) is already writing {plan.output_dir}")
        if decision != "collect":
            teacher = ARMS[plan.arm].switch_from
            check_teacher(
                plan,
                f"python tools/benchmark_accuracy.py run --schedule {plan.schedule} --arms {teacher} "
                f"--seeds {plan.seed} --work-dir {work_dir} --results-dir {results_dir} "
                f"--data-root {data_root}",
            )
            print(f"[benchmark_accuracy] {decision} {label} in {plan.output_dir}", flush=True)
            train(plan, data_root, resume=decision == "resume", threads=args.threads)
        else:
            print(f"[benchmark_accuracy] {label} finished but not recorded: recording it", flush=True)
        record(plan, machine)


def record_stored(args) -> None:
    """The ``record`` subcommand: rewrite every stored result from its run's folder, keeping its
    machine and extra overrides; a result whose folder holds no finished run is left as it is."""
    work_dir, results_dir = map(repo_path, (args.work_dir, args.results_dir))
    os.chdir(REPO)  # as in run: the recorded OUTPUT_DIR keeps its short form
    stored = load_results(results_dir)
    if not stored:
        raise AblationError(f"no result file under --results-dir {args.results_dir}")
    for old in stored:
        plan = plan_run(
            ARMS, old["arm"], parse_schedule(old["schedule"]), old["seed"], work_dir, results_dir,
            old["extra_opts"],
        )
        if run_finished(plan):
            record(plan, old["machine"], prune=False)
        else:
            print(
                f"[benchmark_accuracy] kept {plan.result_file}: no finished run in {plan.output_dir}", flush=True
            )


def readme_with_tables(path: str, results: List[Dict]) -> str:
    """The text of the Markdown file ``path`` with the curve schedule's tables between its marker
    lines (read as bytes, so that its line endings stay as they are)."""
    text = Path(path).read_bytes().decode("utf-8")
    return replace_marked_block(text, readme_tables(results, list(ARMS), README_LABELS, REFERENCE_ARMS), path)


def report(args) -> None:
    """The ``report`` subcommand: results.md, accuracy.png and branch.png from every stored result,
    and (``--readme``) the README's tables between their markers."""
    results = load_results(args.results_dir)
    if not results:
        raise AblationError(f"no result file under --results-dir {args.results_dir}")
    # The README is checked before anything is written: a missing marker leaves every file as it was.
    readme = None if args.readme is None else readme_with_tables(args.readme, results)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = results_markdown(results, list(ARMS), REFERENCE_ARMS)
    (output_dir / "results.md").write_text(markdown)
    plot_accuracy(results, list(ARMS), output_dir / "accuracy.png")
    drawn = plot_branch(results, list(ARMS), output_dir / "branch.png")
    print(markdown)
    print(f"[benchmark_accuracy] branch.png: {', '.join(drawn) or 'no run with a softmax branch'}", flush=True)
    if readme is not None:
        write_text_atomic(args.readme, readme)
        print(f"[benchmark_accuracy] {args.readme}: tables rewritten between their markers", flush=True)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def argument_parser() -> argparse.ArgumentParser:
    """The ``run``, ``record`` and ``report`` subcommands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="train and evaluate arms (resumable)",
        epilog="arms: " + "; ".join(f"{name}: {arm.description}" for name, arm in ARMS.items()),
    )
    run_parser.add_argument("--schedule", required=True, help="curve or iters<S>, S a multiple of 8")
    run_parser.add_argument("--arms", nargs="+", required=True)
    run_parser.add_argument("--seeds", nargs="+", type=int, required=True)
    run_parser.add_argument("--data-root", default=str(REPO.parent / "shared/datasets/bccd"))
    run_parser.add_argument("--work-dir", default=str(REPO / "output/benchmark_accuracy"))
    run_parser.add_argument("--results-dir", default=str(REPO / RESULTS_DIR))
    run_parser.add_argument(
        "--threads", type=positive_int, default=torch.get_num_threads(),
        help="intra-op threads of each train_net (default: PyTorch's, here %(default)s); two "
        "runners with --threads 1 train two runs side by side on a 2-CPU machine",
    )
    run_parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides added to every run")
    record_parser = commands.add_parser(
        "record", help="rewrite the stored results from the finished runs' folders (no training)"
    )
    record_parser.add_argument("--work-dir", default=str(REPO / "output/benchmark_accuracy"))
    record_parser.add_argument("--results-dir", default=str(REPO / RESULTS_DIR))
    report_parser = commands.add_parser("report", help="tables and figure from the stored results")
    report_parser.add_argument("--results-dir", default=str(REPO / RESULTS_DIR))
    report_parser.add_argument("--output-dir", default=str(REPO / "docs/benchmarks/bccd"))
    report_parser.add_argument(
        "--readme", metavar="PATH",
        help="also rewrite the curve schedule's two tables in this Markdown file (e.g. README.md), "
        "between its lines <!-- bccd-accuracy-tables:begin --> and <!-- bccd-accuracy-tables:end -->; "
        "default: none (only --output-dir's files are written)",
    )
    return parser


SUBCOMMANDS = {"run": run_series, "record": record_stored, "report": report}


def run(argv: Optional[List[str]] = None) -> None:
    """Console entry point (``castling-benchmark-accuracy``)."""
    args = argument_parser().parse_args(argv)
    # SIGTERM (a session ending) unwinds like Ctrl-C: the subprocess is ended, its time saved.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(f"stopped by signal {signum}"))
    try:
        SUBCOMMANDS[args.command](args)
    except AblationError as error:
        sys.exit(f"[benchmark_accuracy] error: {error}")


if __name__ == "__main__":
    run()
