"""The demo: predictions of a trained detector drawn on images, folders of images or a video."""
from .drawing import dataset_metadata, draw_predictions
from .images import expand_image_paths, image_output_paths, read_demo_image, run_on_images
from .predictor import BranchPredictor
from .video import run_on_video, video_output_path

__all__ = [
    "BranchPredictor",
    "dataset_metadata",
    "draw_predictions",
    "expand_image_paths",
    "image_output_paths",
    "read_demo_image",
    "run_on_images",
    "run_on_video",
    "video_output_path",
]
