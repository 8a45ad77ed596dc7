"""Export a trained Castling-ViT detector (softmax branch off) to TorchScript and/or ONNX.

Like Detectron2's tools/deploy/export_model.py, it traces the detector through Detectron2's
TracingAdapter, with the softmax branch off, as deployed.

The model is traced on the CPU, in fp32, on the first sample image: the first images of the
config's first test set, or the ``--sample-image`` files, read and resized as the test loader does.
It writes ``model.ts`` (``torch.jit.load``, after ``import torchvision``, whose ops it calls) and
``model.onnx`` (onnxruntime) to ``--output``; both take one ``(3, H, W)`` image in ``INPUT.FORMAT``
and return the detections' tensors before Detectron2's ``detector_postprocess``. ``--verify`` runs
each exported model on every sample image and compares its detections with the eager model's
(exit status 1 if they differ).

Examples:
    python tools/export_model.py --config-file output/run/config.yaml --output /tmp/export \\
        --verify MODEL.WEIGHTS output/run/model_final.pth
    python tools/export_model.py --config-file CONFIG --output DIR --sample-image photo.jpg \\
        MODEL.WEIGHTS model_final.pth
"""
import argparse
import itertools
import logging
import os

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from castling_det import load_castling_config
from castling_det.data.mapper import CheckedDatasetMapper
from castling_det.engine import CastlingCheckpointer, build_checked_test_loader
from castling_det.engine.cli import add_dataset_arguments, register_datasets, setup_castling_logger
from castling_det.export import (
    EXPORT_FILE_NAMES,
    EXPORT_FORMATS,
    build_tracing_adapter,
    compare_on_images,
    export_onnx,
    export_torchscript,
    fixed_input_grid_warning,
    load_exported,
    prepare_for_export,
)

logger = logging.getLogger("castling_det.export")
# Largest box coordinate difference (input pixels) that --verify accepts.
BOX_TOLERANCE = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--format", choices=(*EXPORT_FORMATS, "both"), default="both", help="what to export (default: both)"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts / model.onnx")
    parser.add_argument(
        "--sample-image", action="append", default=[], metavar="PATH",
        help="trace (and verify) on this image instead of the test set's (repeatable)",
    )
    parser.add_argument(
        "--num-images", type=int, default=5,
        help="test-set images to verify on, the first of which is traced on (default 5)",
    )
    parser.add_argument("--verify", action="store_true", help="compare each exported model with eager")
    add_dataset_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images {args.num_images}: must be at least 1")
    for path in args.sample_image:
        if not os.path.isfile(path):
            parser.error(f"--sample-image {path!r}: no such file")
    return parser, args


def load_config(args, parser):
    """The frozen config of the file and overrides, on the CPU, with its weights checked."""
    # Traced on the CPU; onnxruntime runs it there too.
    cfg = load_castling_config(args.config_file, args.opts, device="cpu")
    cfg.freeze()
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        parser.error("MODEL.WEIGHTS is empty: give the trained weights, e.g. MODEL.WEIGHTS model_final.pth")
    if "://" not in weights and not os.path.isfile(weights):
        parser.error(f"MODEL.WEIGHTS {weights!r}: no such file")
    return cfg


def sample_images(cfg, args, parser):
    """The sample images, ``(3, H, W)`` tensors resized as the test loader resizes them."""
    if args.sample_image:
        mapper = CheckedDatasetMapper(cfg, is_train=False)
        records = [{"file_name": path, "image_id": i} for i, path in enumerate(args.sample_image)]
        return [mapper(record)["image"] for record in records]
    if not cfg.DATASETS.TEST:
        parser.error("DATASETS.TEST is empty: register a test set or give --sample-image")
    loader = build_checked_test_loader(cfg, cfg.DATASETS.TEST[0])
    return [batch[0]["image"] for batch in itertools.islice(loader, args.num_images)]


def verify(adapter, path, images) -> bool:
    """Log how far the exported model at ``path`` is from eager on ``images``; True if it matches."""
    comparisons = compare_on_images(adapter, load_exported(path), images)
    for index, c in enumerate(comparisons):
        logger.info(
            "image %d: %d eager / %d exported detections, %d unpaired; max |Δ| box %.3g px, "
            "score %.3g, mask %s", index, c.num_eager, c.num_exported, c.num_unmatched,
            c.max_box_diff, c.max_score_diff, "-" if c.max_mask_diff is None else f"{c.max_mask_diff:.3g}",
        )
    ok = all(c.matches(BOX_TOLERANCE) for c in comparisons)
    logger.info(
        "%s: max box difference %.3g px over %d image(s), %d detections; %s (box tolerance %g px)",
        path, max(c.max_box_diff for c in comparisons), len(images),
        sum(c.num_eager for c in comparisons), "MATCHES eager" if ok else "DIFFERS from eager", BOX_TOLERANCE,
    )
    return ok


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output)
    setup_castling_logger(args.output)
    register_datasets(args)
    cfg = load_config(args, parser)

    model = build_model(cfg)
    CastlingCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    prepare_for_export(model)
    images = sample_images(cfg, args, parser)
    adapter = build_tracing_adapter(model, images[0])
    warning = fixed_input_grid_warning(adapter, images[0])
    if warning:
        logger.warning(warning)

    all_match = True
    for fmt in EXPORT_FORMATS if args.format == "both" else (args.format,):
        path = os.path.join(args.output, EXPORT_FILE_NAMES[fmt])
        if fmt == "torchscript":
            export_torchscript(adapter, images[0], path)
        else:
            export_onnx(adapter, images[0], path)
        logger.info("exported %s (traced on a %s image) to %s", fmt, tuple(images[0].shape), path)
        if args.verify:
            all_match &= verify(adapter, path, images)
    return 0 if all_match else 1


def run():
    """Console entry point (`castling-export`)."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
