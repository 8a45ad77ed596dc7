"""Command-line plumbing shared by tools/train_net.py, tools/lazyconfig_train_net.py and
tools/export_model.py."""
import torch.distributed as dist
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import register_coco_dataset, register_voc_dataset
from .branch_switch import format_switch_table

__all__ = [
    "add_dataset_arguments",
    "argument_parser",
    "eval_branch_states",
    "launch_from_args",
    "launch_training_tool",
    "print_switch_table",
    "register_datasets",
    "setup_castling_logger",
]


def argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus ``--register-coco``, ``--register-voc`` and
    ``--softmax-branch``."""
    parser = default_argument_parser(epilog)
    add_dataset_arguments(parser)
    parser.add_argument(
        "--softmax-branch", choices=("on", "off", "both"), default=None,
        help="with --eval-only: evaluate with the branch on, off (as deployed; default) or both",
    )
    return parser


def eval_branch_states(args):
    """The branch states ``--softmax-branch`` asks ``--eval-only`` to evaluate: ``("off",)`` by
    default, ``("on", "off")`` for ``both``.

    Raises:
        SystemExit: ``--softmax-branch`` without ``--eval-only`` (training evaluates with the
            branch on and off anyway), rather than ignoring it.
    """
    if args.softmax_branch is not None and not args.eval_only:
        raise SystemExit(
            f"--softmax-branch {args.softmax_branch} applies to --eval-only; training evaluates "
            "with the branch on and off (see branch_switch.json)"
        )
    if args.softmax_branch == "both":
        return ("on", "off")
    return (args.softmax_branch or "off",)


def add_dataset_arguments(parser) -> None:
    """Add ``--register-coco`` and ``--register-voc`` (read by :func:`register_datasets`) to an
    ``argparse`` parser."""
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format data set under NAME (repeatable)",
    )
    parser.add_argument(
        "--register-voc", nargs=4, action="append", default=[],
        metavar=("NAME", "VOC_ROOT", "SPLIT", "CLASSES"),
        help="register a Pascal VOC split (comma-separated class names) under NAME (repeatable)",
    )


def register_datasets(args) -> None:
    """Register the data sets named by ``--register-coco`` and ``--register-voc``."""
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    for name, voc_root, split, classes in args.register_voc:
        register_voc_dataset(name, voc_root, split, [c.strip() for c in classes.split(",")])


def setup_castling_logger(output_dir) -> None:
    """Show castling_det's log (its data warnings among it) as Detectron2's own: on the console of
    the main process and in ``output_dir``/log.txt."""
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="castling_det", abbrev_name="castling")


def launch_from_args(main, args) -> None:
    """Run ``main(args)`` in ``args.num_gpus`` processes per machine (Gloo on a CPU)."""
    launch(
        _run_then_close_process_group,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(main, args),
    )


def _run_then_close_process_group(main, args):
    """``main(args)``, then the process group closed on every rank once all have finished.

    Detectron2's ``launch`` leaves the group open; a process that exits with Gloo's worker threads
    still alive can abort at interpreter shutdown ("terminate called without an active
    exception"), failing a run whose work had finished.
    """
    result = main(args)
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


def launch_training_tool(main) -> None:
    """Parse the training tools' arguments and run ``main(args)`` in as many processes as asked;
    a bad ``--softmax-branch`` stops here, before any process starts."""
    arguments = argument_parser().parse_args()
    eval_branch_states(arguments)
    launch_from_args(main, arguments)


def print_switch_table(records):
    """Print the switch hook's table(s) on the main process; return ``records``."""
    if comm.is_main_process() and records:
        print("Softmax branch on and off:\n" + format_switch_table(records), flush=True)
    return records
