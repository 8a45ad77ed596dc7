"""The demo on a video: every frame drawn and written to an output video (OpenCV)."""
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

__all__ = ["VIDEO_CODECS", "run_on_video", "video_output_path"]

# The container of the output video sets its codec; both ship with OpenCV's own writers.
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v"}
_DEFAULT_FPS = 25.0


def video_output_path(video_path: str, output: str) -> str:
    """``output`` when it ends in a video suffix (``.avi``, ``.mp4``), else ``output``/the input's
    name (``.avi`` unless the input is an ``.mp4``)."""
    if Path(output).suffix.lower() in VIDEO_CODECS:
        return output
    suffix = Path(video_path).suffix.lower()
    return os.path.join(output, Path(video_path).stem + (suffix if suffix in VIDEO_CODECS else ".avi"))


def run_on_video(video_path: str, output_path: str, annotate: Callable[[np.ndarray], np.ndarray]) -> int:
    """Draw on every frame of ``video_path`` with ``annotate`` (RGB in, RGB of the same size out)
    and write the frames, at the input's frame rate, to ``output_path``.

    Returns:
        The number of frames written.

    Raises:
        FileNotFoundError: ``video_path`` does not exist.
        OSError: OpenCV cannot open or decode ``video_path``, or cannot write ``output_path``.
    """
    if not os.path.isfile(video_path):
        raise FileNotFoundError(f"video {video_path} does not exist")
    capture = cv2.VideoCapture(video_path)
    writer = None
    try:
        if not capture.isOpened():
            raise OSError(f"cannot read video {video_path}: OpenCV cannot open it")
        fps = capture.get(cv2.CAP_PROP_FPS) or _DEFAULT_FPS
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        frames = 0
        with tqdm(total=total, desc="frames", unit="frame") as progress:
            while True:
                ok, frame_bgr = capture.read()
                if not ok:
                    break
                drawn = annotate(np.ascontiguousarray(frame_bgr[:, :, ::-1]))
                if writer is None:
                    writer = _open_writer(output_path, fps, drawn.shape[1], drawn.shape[0])
                writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
                frames += 1
                progress.update()
        if frames == 0:
            raise OSError(f"cannot read video {video_path}: no frame could be decoded")
        return frames
    finally:
        capture.release()
        if writer is not None:
            writer.release()


def _open_writer(path: str, fps: float, width: int, height: int) -> cv2.VideoWriter:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_CODECS:
        raise ValueError(f"output video {path}: use one of the suffixes {sorted(VIDEO_CODECS)}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write video {path} with codec {VIDEO_CODECS[suffix]}")
    return writer
