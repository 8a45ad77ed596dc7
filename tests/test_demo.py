"""tools/demo.py and castling_det.demo: predictions drawn on images, folders and a video, with the
softmax branch on or off, and the errors that name a bad input."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from castling_det.data import SHAPE_CATEGORIES, make_shapes_dataset, register_coco_dataset
from castling_det.demo import (
    BranchPredictor,
    dataset_metadata,
    expand_image_paths,
    image_output_paths,
    video_output_path,
)
from castling_det.modeling.branch import branch_modules
from conftest import tiny_detector_cfg

REPO = Path(__file__).resolve().parents[1]
VIDEO_FRAMES = 4


@pytest.fixture(scope="module")
def demo_tool():
    """The demo tool's module (tools/demo.py and the castling-demo command run its code)."""
    from castling_det.commands import demo

    return demo


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Mask R-CNN with random weights, saved as a config file and a checkpoint. Test images
    of 64 pixels give 16 tokens, where the softmax (about 1/16 per key) passes the branch's 0.02
    threshold, so the branch changes the output."""
    root = tmp_path_factory.mktemp("tiny_model")
    cfg = tiny_detector_cfg("GeneralizedRCNN", mask_on=True)
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "model.pth")
    cfg.MODEL.WEIGHTS = str(root / "model.pth")
    (root / "config.yaml").write_text(cfg.dump())
    return SimpleNamespace(cfg=cfg, config=str(root / "config.yaml"), weights=str(root / "model.pth"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of three PNGs of different sizes and modes (RGB, grey, RGBA) and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (72, 64), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 4-frame MJPG video of 80x64 grey frames with a moving white square."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (80, 64))
    assert writer.isOpened()
    for index in range(VIDEO_FRAMES):
        frame = np.full((64, 80, 3), 90, dtype=np.uint8)
        frame[20:40, 10 + 8 * index : 30 + 8 * index] = 255
        writer.write(frame)
    writer.release()
    return path


def _demo_args(tiny_model, *args):
    return ["--config-file", tiny_model.config, *map(str, args), "MODEL.WEIGHTS", tiny_model.weights]


def _rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _video_frames(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def test_demo_script_draws_on_every_image_of_a_folder_in_its_size(tiny_model, images, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"),
         # --input last: its nargs="+" must leave the trailing MODEL.WEIGHTS override alone.
         *_demo_args(tiny_model, "--output", output, "--confidence-threshold", 0.0, "--input", images)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir()) == ["a.png", "b.png", "c.png"]
    for name in ("a.png", "b.png", "c.png"):
        original, drawn = _rgb(images / name), _rgb(output / name)
        assert drawn.shape == original.shape  # grey and RGBA inputs come out as RGB of their size
        assert (drawn != original).any(axis=-1).mean() > 0.05, name  # boxes and masks drawn
    assert "Wrote 3 images" in result.stdout + result.stderr


def test_nothing_is_drawn_above_every_score_and_boxes_are_drawn_below(
    demo_tool, tiny_model, images, tmp_path
):
    for threshold in (0.0, 1.0):
        demo_tool.main(_demo_args(tiny_model, "--input", images / "a.png", "--output",
                                  tmp_path / f"{threshold}.png", "--confidence-threshold", threshold))
    original = _rgb(images / "a.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "1.0.png"), original)  # scores are below 1
    drawn = _rgb(tmp_path / "0.0.png")
    instances = BranchPredictor(tiny_model.cfg)(original)["instances"]
    x0, y0, x1, y1 = instances.pred_boxes.tensor[instances.scores.argmax()].round().int().tolist()
    top_edge = (drawn[y0, x0:x1] != original[y0, x0:x1]).any(axis=-1)
    assert top_edge.mean() > 0.8  # the best box's outline is on the image


def test_the_softmax_branch_on_and_off_give_different_predictions(tiny_model, images):
    image = _rgb(images / "a.png")
    on, off = (BranchPredictor(tiny_model.cfg, softmax_branch_on=state) for state in (True, False))
    assert all(m.softmax_branch and m.branch_scale == 1.0 for m in branch_modules(on.model))
    assert branch_modules(off.model) and not any(m.softmax_branch for m in branch_modules(off.model))
    scores_on, scores_off = (predictor(image)["instances"].scores for predictor in (on, off))
    assert not torch.allclose(scores_on, scores_off, rtol=0, atol=1e-6)
    again = BranchPredictor(tiny_model.cfg, softmax_branch_on=False)(image)["instances"].scores
    torch.testing.assert_close(again, scores_off, rtol=0, atol=0)  # the difference is the branch


def test_inputs_expand_to_files_folders_and_globs(images, tmp_path):
    pngs = [str(images / name) for name in ("a.png", "b.png", "c.png")]
    assert expand_image_paths([str(images)]) == pngs  # the text file is left out
    assert expand_image_paths([str(images / "[ab].png"), pngs[2]]) == pngs
    assert image_output_paths(pngs[:1], str(tmp_path / "x.jpg")) == [str(tmp_path / "x.jpg")]
    assert image_output_paths(pngs, str(tmp_path)) == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    with pytest.raises(ValueError, match="names one image, but there are 3 inputs"):
        image_output_paths(pngs, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="share the file names"):
        image_output_paths([pngs[0], str(tmp_path / "a.png")], str(tmp_path / "out"))
    assert video_output_path("clip.mp4", "/o") == "/o/clip.mp4"
    assert video_output_path("clip.mov", "/o") == "/o/clip.avi"
    assert video_output_path("clip.mov", "/o/v.mp4") == "/o/v.mp4"


def test_class_names_come_from_a_registered_data_set(tiny_model, tmp_path):
    splits = make_shapes_dataset(tmp_path, num_train=1, num_val=1, image_size=64, seed=1)
    register_coco_dataset("demo_test_shapes_val", *map(str, splits["val"]))
    cfg = tiny_model.cfg.clone()
    cfg.DATASETS.TEST = ("demo_test_shapes_val",)
    assert list(dataset_metadata(cfg).thing_classes) == [c["name"] for c in SHAPE_CATEGORIES]
    cfg.DATASETS.TEST = ("never_registered",)
    assert dataset_metadata(cfg).get("thing_classes") is None  # drawn as class numbers


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------
def test_demo_draws_on_every_frame_of_a_video(demo_tool, tiny_model, video, tmp_path):
    for threshold in (0.0, 1.0):
        demo_tool.main(_demo_args(tiny_model, "--video-input", video, "--output",
                                  tmp_path / f"{threshold}.avi", "--confidence-threshold", threshold))
    original, drawn, undrawn = (_video_frames(p) for p in (video, tmp_path / "0.0.avi", tmp_path / "1.0.avi"))
    assert len(drawn) == len(undrawn) == len(original) == VIDEO_FRAMES
    for frame, with_boxes, without in zip(original, drawn, undrawn):
        assert with_boxes.shape == without.shape == frame.shape == (64, 80, 3)
        # Both are MJPG re-encodings of the frame; only one has boxes and masks on it.
        assert np.abs(without.astype(int) - frame).mean() < 3
        assert np.abs(with_boxes.astype(int) - frame).mean() > 10


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _error(demo_tool, tiny_model, *args):
    with pytest.raises(SystemExit) as raised:
        demo_tool.main(_demo_args(tiny_model, *args))
    return str(raised.value)


def test_errors_name_the_missing_input_the_empty_folder_and_the_missing_checkpoint(
    demo_tool, tiny_model, images, tmp_path
):
    missing = tmp_path / "nope.png"
    message = _error(demo_tool, tiny_model, "--input", missing, "--output", tmp_path)
    assert f"input {missing} does not exist" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _error(demo_tool, tiny_model, "--input", empty, "--output", tmp_path)
    assert f"folder {empty} has no images" in message
    video = tmp_path / "nope.avi"
    assert f"video {video} does not exist" in _error(
        demo_tool, tiny_model, "--video-input", video, "--output", tmp_path)
    with pytest.raises(SystemExit, match="checkpoint /nowhere/model.pth does not exist"):
        demo_tool.main(["--config-file", tiny_model.config, "--input", str(images), "--output", str(tmp_path),
                        "MODEL.WEIGHTS", "/nowhere/model.pth"])


def test_errors_name_an_unreadable_image_and_an_unreadable_video(demo_tool, tiny_model, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    message = _error(demo_tool, tiny_model, "--input", images / "a.png", broken, "--output", tmp_path / "out")
    assert f"cannot read image {broken}" in message
    fake_video = tmp_path / "fake.avi"
    fake_video.write_bytes(b"RIFF not a video at all")
    message = _error(demo_tool, tiny_model, "--video-input", fake_video, "--output", tmp_path / "out")
    assert f"cannot read video {fake_video}" in message
