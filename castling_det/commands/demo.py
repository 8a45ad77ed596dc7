"""Draw a trained Castling-ViT detector's predictions on images, folders of images or a video,
like Detectron2's demo/demo.py, and write the drawn images (or video).

Examples:
    python tools/demo.py --config-file output/run/config.yaml --input photos/ --output /tmp/demo \\
        MODEL.WEIGHTS output/run/model_final.pth
    python tools/demo.py --config-file CONFIG --input 'images/*.jpg' a.png --output /tmp/demo \\
        --softmax-branch on --confidence-threshold 0.3 MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file CONFIG --video-input clip.mp4 --output /tmp/demo/clip.avi \\
        --register-coco shapes_val val.json val/ MODEL.WEIGHTS model_final.pth
"""
import argparse
import logging
import re
import sys

from detectron2.utils.logger import setup_logger

from castling_det import load_castling_config
from castling_det.demo import (
    BranchPredictor,
    dataset_metadata,
    draw_predictions,
    expand_image_paths,
    image_output_paths,
    run_on_images,
    run_on_video,
    video_output_path,
)
from castling_det.engine.cli import add_dataset_arguments, register_datasets

logger = logging.getLogger("castling_det.demo")
# A config override's key, as in "MODEL.WEIGHTS": upper-case words joined by dots.
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config (yacs)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or globs (quote globs)")
    source.add_argument("--video-input", metavar="PATH", help="a video file")
    parser.add_argument(
        "--output", required=True,
        help="a folder, or a file: an image for a single input image, an .avi/.mp4 for a video",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw instances scoring at least this (default 0.5)")
    parser.add_argument("--softmax-branch", choices=("on", "off"), default="off",
                        help="the auxiliary softmax branch: off as deployed (default), or on at scale 1")
    add_dataset_arguments(parser)  # --register-coco / --register-voc, for the class names
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS FILE")
    args = parser.parse_args(argv)
    if args.input:
        # "--input a.png MODEL.WEIGHTS w.pth": --input's nargs="+" also took the overrides.
        first_key = next((i for i, item in enumerate(args.input) if _CONFIG_KEY.match(item)), None)
        if first_key is not None:
            args.input, args.opts = args.input[:first_key], args.input[first_key:] + args.opts
        if not args.input:
            parser.error("--input: no image given")
    return args


def setup_cfg(args):
    """The frozen config: the file, the overrides, and the model's own score thresholds lowered
    to the confidence threshold so that no instance above it is lost."""
    cfg = load_castling_config(args.config_file, args.opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    return cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="castling_det", abbrev_name="castling")
    setup_logger(name="fvcore")
    try:
        register_datasets(args)
        cfg = setup_cfg(args)
        # The inputs are checked before the model is built: a typo fails at once.
        if args.input:
            image_paths = expand_image_paths(args.input)
            output_paths = image_output_paths(image_paths, args.output)
        predictor = BranchPredictor(cfg, softmax_branch_on=args.softmax_branch == "on")
        metadata = dataset_metadata(cfg)

        def annotate(image_rgb):
            return draw_predictions(image_rgb, predictor(image_rgb), metadata, args.confidence_threshold)

        if args.input:
            run_on_images(image_paths, output_paths, annotate)
            logger.info("Wrote %d images to %s", len(output_paths), args.output)
        else:
            output_path = video_output_path(args.video_input, args.output)
            frames = run_on_video(args.video_input, output_path, annotate)
            logger.info("Wrote %d frames to %s", frames, output_path)
    except (OSError, ValueError) as err:  # missing or unreadable inputs, bad settings
        sys.exit(f"demo.py: error: {err}")


def run():
    """Console entry point (`castling-demo`)."""
    main()


if __name__ == "__main__":
    run()
