"""Bad input in the data path: degenerate and out-of-image boxes, grey / alpha / 16-bit images,
unreadable image files and annotation files that do not parse."""
import itertools
import json
import logging
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image

from castling_det.data import (
    CheckedDatasetMapper,
    ImageReadError,
    clean_boxes,
    make_shapes_dataset,
    read_image,
    register_coco_dataset,
    register_voc_dataset,
)
from castling_det.engine import CastlingTrainer
from conftest import tiny_detector_cfg

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd"
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
HEIGHT, WIDTH = 48, 64


@pytest.fixture
def dataset_name(request):
    """A data set name of this test alone, taken out of Detectron2's catalogues afterwards."""
    name = "robust_" + re.sub(r"\W", "_", request.node.name)
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("castling_det")
            and r.levelno == logging.WARNING]


def _write_coco(path: Path, images, boxes_per_image):
    """A COCO instances file of ``images`` ((file_name, width, height)) with, for each, its
    ``[x, y, w, h]`` boxes (all of class 1), and three classes."""
    annotations = []
    ids = itertools.count(1)
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        for box in boxes:
            annotations.append({"id": next(ids), "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f, "width": w, "height": h}
                   for i, (f, w, h) in enumerate(images, start=1)],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(("a", "b", "c"), start=1)],
    }))
    return path


def _write_voc(root: Path, objects_per_record):
    """A VOC layout with the split ``train``: record ``img{i}`` holds objects ``(class, xmin, ymin,
    xmax, ymax)`` in 1-based inclusive pixel corners."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(len(objects_per_record))]
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids) + "\n")
    for record_id, objects in zip(ids, objects_per_record):
        parts = [f"<annotation><size><width>{WIDTH}</width><height>{HEIGHT}</height></size>"]
        for name, *corners in objects:
            box = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), corners))
            parts.append(f"<object><name>{name}</name><bndbox>{box}</bndbox></object>")
        (root / "Annotations" / f"{record_id}.xml").write_text("".join(parts) + "</annotation>")
    return root


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------
def test_clean_boxes_clips_drops_and_counts_each_kind():
    records = [
        {"file_name": "/d/a.jpg", "width": 100, "height": 80, "annotations": [
            {"bbox": [10, 10, 20, 20], "bbox_mode": BoxMode.XYWH_ABS},
            {"bbox": [30, 30, 0, 10], "bbox_mode": BoxMode.XYWH_ABS},     # zero width
            {"bbox": [90, 70, 30, 30], "bbox_mode": BoxMode.XYWH_ABS},    # partly outside
            {"bbox": [120, 10, 10, 10], "bbox_mode": BoxMode.XYWH_ABS},   # wholly outside
        ]},
        {"file_name": "/d/b.jpg", "width": 50, "height": 50, "annotations": [
            {"bbox": [5, 5, 10, 0], "bbox_mode": BoxMode.XYWH_ABS},       # zero height
            {"bbox": [-10, -10, -5, 5], "bbox_mode": BoxMode.XYXY_ABS},   # wholly outside (left)
            {"bbox": [8, 9, 3, 20], "bbox_mode": BoxMode.XYXY_ABS},       # negative width
        ]},
    ]
    messages = clean_boxes(records, "x")
    assert messages == [
        "data set 'x': dropped 3 of 7 boxes of zero or negative width or height "
        "(first: image 'a.jpg', object 2)",
        "data set 'x': dropped 2 of 7 boxes lying wholly outside their image "
        "(first: image 'a.jpg', object 4)",
        "data set 'x': clipped 1 of 7 boxes reaching outside their image to its borders "
        "(first: image 'a.jpg', object 3)",
    ]
    assert [a["bbox"] for a in records[0]["annotations"]] == [[10, 10, 20, 20], [90.0, 70.0, 10.0, 10.0]]
    assert records[1]["annotations"] == []  # the record stays, with no box left


def test_clean_boxes_min_size_and_silence_on_clean_data():
    records = [{"file_name": "c.jpg", "width": 10, "height": 10, "annotations": [
        {"bbox": [2, 2, 3, 8], "bbox_mode": BoxMode.XYXY_ABS},   # 1 pixel wide
        {"bbox": [2, 2, 4, 8], "bbox_mode": BoxMode.XYXY_ABS},
    ]}]
    assert clean_boxes(records, "x", min_size=0.0) == []
    assert len(records[0]["annotations"]) == 2
    assert clean_boxes(records, "x", min_size=1.0) == [
        "data set 'x': dropped 1 of 2 boxes of zero or negative width or height "
        "(first: image 'c.jpg', object 1)"
    ]
    assert [a["bbox"] for a in records[0]["annotations"]] == [[2, 2, 4, 8]]


def test_coco_registration_warns_once_per_kind_and_keeps_empty_images(tmp_path, dataset_name, caplog):
    json_file = _write_coco(
        tmp_path / "instances.json",
        [("one.jpg", WIDTH, HEIGHT), ("two.jpg", WIDTH, HEIGHT)],
        [[[1, 1, 10, 10], [5, 5, 0, 9], [60, 40, 10, 10]], [[3, 3, 7, 0]]],
    )
    register_coco_dataset(dataset_name, str(json_file), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="castling_det"):
        records = DatasetCatalog.get(dataset_name)
        first_load = _warnings(caplog)
        DatasetCatalog.get(dataset_name)  # an evaluation reads the catalogue again
    assert first_load == [
        f"data set {dataset_name!r}: dropped 2 of 4 boxes of zero or negative width or height "
        "(first: image 'one.jpg', object 2)",
        f"data set {dataset_name!r}: clipped 1 of 4 boxes reaching outside their image to its borders "
        "(first: image 'one.jpg', object 3)",
    ]
    assert _warnings(caplog) == first_load  # not again on the second load
    assert [len(r["annotations"]) for r in records] == [2, 0]
    assert records[0]["annotations"][1]["bbox"] == [60.0, 40.0, 4.0, 8.0]
    assert MetadataCatalog.get(dataset_name).json_file == str(json_file)


def test_voc_registration_drops_boxes_of_zero_width_in_the_file(tmp_path, dataset_name, caplog):
    root = _write_voc(tmp_path, [[("a", 5, 5, 20, 20), ("b", 7, 3, 7, 30)], [("a", 1, 1, 64, 48)]])
    register_voc_dataset(dataset_name, str(root), "train", ["a", "b"])
    with caplog.at_level(logging.WARNING, logger="castling_det"):
        records = DatasetCatalog.get(dataset_name)
    assert _warnings(caplog) == [
        f"data set {dataset_name!r}: dropped 1 of 3 boxes of zero or negative width or height "
        "(first: image 'img0.jpg', object 2)"
    ]
    # VOC's 1-based corners (1, 1, 64, 48) cover the whole image exactly: nothing to clip.
    assert [[a["bbox"] for a in r["annotations"]] for r in records] == [
        [[4.0, 4.0, 20.0, 20.0]], [[0.0, 0.0, 64.0, 48.0]]
    ]


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"{BCCD} absent")
def test_bccd_degenerate_boxes_are_counted_and_dropped(dataset_name, caplog):
    record_ids = (BCCD / "ImageSets/Main/trainval.txt").read_text().split()
    total, degenerate, first = 0, 0, None
    for record_id in record_ids:  # the count, independently of the code under test
        objects = ET.parse(BCCD / "Annotations" / f"{record_id}.xml").findall("object")
        for number, obj in enumerate(objects, start=1):
            x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            total += 1
            if x1 <= x0 or y1 <= y0:
                degenerate += 1
                first = first or (f"{record_id}.jpg", number)
    assert degenerate >= 1, "BCCD is known to hold point-like boxes"
    register_voc_dataset(dataset_name, str(BCCD), "trainval", BCCD_CLASSES)
    with caplog.at_level(logging.WARNING, logger="castling_det"):
        records = DatasetCatalog.get(dataset_name)
    assert _warnings(caplog) == [
        f"data set {dataset_name!r}: dropped {degenerate} of {total} boxes of zero or negative width or "
        f"height (first: image {first[0]!r}, object {first[1]})"
    ]
    assert len(records) == len(record_ids)
    assert sum(len(r["annotations"]) for r in records) == total - degenerate


# --------------------------------------------------------------------------------------------
# Images of every pixel format
# --------------------------------------------------------------------------------------------
def _grey_levels(peak: int) -> np.ndarray:
    """A HEIGHT x WIDTH ramp from 0 to ``peak`` with both ends present."""
    return np.linspace(0, peak, HEIGHT * WIDTH).round().reshape(HEIGHT, WIDTH)


def _write_odd_image(stem: Path, mode: str) -> Tuple[Path, np.ndarray]:
    """Write an image that PIL opens in ``mode`` next to ``stem``; return its path and the 8-bit RGB
    pixels it should give."""
    if mode == "L":
        path, grey = stem.with_suffix(".png"), _grey_levels(255).astype(np.uint8)
        Image.fromarray(grey).save(path)
        expected = np.repeat(grey[..., None], 3, axis=2)
    elif mode == "RGBA":
        path = stem.with_suffix(".png")
        rgba = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
        Image.fromarray(rgba).save(path)
        expected = rgba[..., :3]
    elif mode in ("I;16", "I"):
        # 16-bit PNG ("I;16") and 32-bit TIFF ("I") of 16-bit levels: scaled by 255 / 65535.
        levels = _grey_levels(65535)
        dtype, suffix = (np.uint16, ".png") if mode == "I;16" else (np.int32, ".tif")
        path = stem.with_suffix(suffix)
        Image.fromarray(levels.astype(dtype)).save(path)
        grey = np.round(levels * 255 / 65535).astype(np.uint8)
        expected = np.repeat(grey[..., None], 3, axis=2)
    else:
        raise ValueError(mode)
    with Image.open(path) as image:
        assert image.mode == mode  # the file really is what the test means
    return path, expected


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "I"])
def test_read_image_gives_8_bit_3_channels(tmp_path, mode, image_format):
    path, expected_rgb = _write_odd_image(tmp_path / "image", mode)
    image = read_image(str(path), image_format)
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    expected = expected_rgb if image_format == "RGB" else expected_rgb[..., ::-1]
    np.testing.assert_array_equal(image, expected)  # 16-bit: scaled, where PIL alone would clip


@pytest.mark.parametrize(
    "pixels,reason",
    [(np.full((4, 4), 70000, dtype=np.int32), "grey levels 70000..70000 .* outside the 16-bit range"),
     (np.full((4, 4), 0.5, dtype=np.float32), "floating-point pixels .* not supported")],
    ids=["int32", "float32"],
)
def test_read_image_rejects_what_it_cannot_scale(tmp_path, pixels, reason):
    Image.fromarray(pixels).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=reason):
        read_image(str(tmp_path / "wide.tif"), "RGB")


def _odd_images_dataset(tmp_path, name):
    """A COCO data set of one image per odd pixel format, each with one box, registered as ``name``."""
    images, boxes = [], []
    for mode in ("L", "RGBA", "I;16", "I"):
        path, _ = _write_odd_image(tmp_path / mode.replace(";", "_"), mode)
        images.append((path.name, WIDTH, HEIGHT))
        boxes.append([[8, 6, 30, 24]])
    register_coco_dataset(name, str(_write_coco(tmp_path / "odd.json", images, boxes)), str(tmp_path))


def _loader_cfg(name):
    cfg = tiny_detector_cfg("GeneralizedRCNN")
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)
    cfg.INPUT.MAX_SIZE_TRAIN = WIDTH
    cfg.INPUT.MIN_SIZE_TEST = HEIGHT
    cfg.INPUT.MAX_SIZE_TEST = WIDTH
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def test_trainer_loaders_train_and_infer_on_grey_alpha_and_16_bit_images(tmp_path, dataset_name):
    _odd_images_dataset(tmp_path, dataset_name)
    cfg = _loader_cfg(dataset_name)
    batch = next(iter(CastlingTrainer.build_train_loader(cfg)))
    assert len(batch) == 4
    for item in batch:
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, HEIGHT, WIDTH)
        assert len(item["instances"]) == 1
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()

    model.eval()
    test_batches = list(CastlingTrainer.build_test_loader(cfg, dataset_name))
    assert len(test_batches) == 4
    with torch.no_grad():
        outputs = [model(inputs)[0] for inputs in test_batches]
    assert all(out["instances"].image_size == (HEIGHT, WIDTH) for out in outputs)


# --------------------------------------------------------------------------------------------
# Unreadable image files
# --------------------------------------------------------------------------------------------
def _write_bad_image(path: Path, kind: str) -> None:
    if kind == "truncated JPEG":
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path, "JPEG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind != "missing":
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated JPEG", "random bytes", "empty file"])
def test_unreadable_image_is_named_with_its_record(tmp_path, kind):
    path = tmp_path / "broken.jpg"
    _write_bad_image(path, kind)
    mapper = CheckedDatasetMapper(_loader_cfg("robust_bad"), is_train=True, dataset_names=("robust_bad",))
    record = {"file_name": str(path), "image_id": 7, "width": WIDTH, "height": HEIGHT, "annotations": []}
    with pytest.raises(ImageReadError) as caught:
        mapper(record)
    message = str(caught.value)
    assert message.startswith(f"cannot read image {path} (image id 7 of data set 'robust_bad'): ")
    assert caught.value.__suppress_context__  # PIL's own traceback is not chained on


def test_unreadable_image_is_named_through_a_worker_process(tmp_path, dataset_name):
    json_file = _write_coco(tmp_path / "bad.json", [("broken.jpg", WIDTH, HEIGHT)] * 2, [[[1, 1, 5, 5]]] * 2)
    _write_bad_image(tmp_path / "broken.jpg", "random bytes")
    register_coco_dataset(dataset_name, str(json_file), str(tmp_path))
    cfg = _loader_cfg(dataset_name)
    cfg.DATALOADER.NUM_WORKERS = 1
    image = tmp_path / "broken.jpg"
    named = f"cannot read image {image} (image id 1 of data set {dataset_name!r})"
    with pytest.raises(ImageReadError, match=re.escape(named)):
        next(iter(CastlingTrainer.build_test_loader(cfg, dataset_name)))


def test_train_net_reports_dropped_boxes_and_stops_on_a_corrupt_image(tmp_path):
    splits = make_shapes_dataset(tmp_path / "data", num_train=4, num_val=1, image_size=96)
    json_file, image_dir = splits["train"]
    coco = json.loads(json_file.read_text())
    coco["annotations"][0]["bbox"][2] = 0.0  # zero width
    json_file.write_text(json.dumps(coco))
    broken = coco["images"][-1]
    _write_bad_image(image_dir / broken["file_name"], "truncated JPEG")  # PIL goes by content
    cmd = [
        sys.executable, str(REPO / "tools" / "train_net.py"),
        "--config-file", str(REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"),
        "--register-coco", "bad_train", str(json_file), str(image_dir),
        "DATASETS.TRAIN", "('bad_train',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"),
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.CASTLING.DEPTH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "data set 'bad_train': dropped 1 of " in (tmp_path / "out" / "log.txt").read_text()
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"castling_det.data.images.ImageReadError: cannot read image {image_dir / broken['file_name']} "
        f"(image id {broken['id']} of data set 'bad_train'): OSError: image file is truncated"
    ), result.stderr[-3000:]
    # No PIL frames, neither in Python's traceback nor in the one Detectron2's trainer logs.
    assert "/PIL/" not in result.stderr and "/PIL/" not in result.stdout


# --------------------------------------------------------------------------------------------
# Annotation files that do not parse
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b'{"images": [', b"\xff\xfe\x00\x01 not text"], ids=["cut", "binary"])
def test_coco_file_that_is_not_json_is_named_at_load_time(tmp_path, dataset_name, content):
    json_file = tmp_path / "instances.json"
    json_file.write_bytes(content)
    register_coco_dataset(dataset_name, str(json_file), str(tmp_path))  # lazy: nothing read yet
    with pytest.raises(ValueError, match=re.escape(f"annotation file {json_file} is not valid JSON: ")):
        DatasetCatalog.get(dataset_name)


@pytest.mark.parametrize(
    "problem,error,expected",
    [
        ("broken XML", ValueError, "is not valid XML: mismatched tag"),
        ("unknown class", ValueError, "names classes ['c'] not in the given ['a', 'b']"),
        ("missing file", FileNotFoundError, "does not exist"),
    ],
)
def test_voc_annotation_problem_names_file_and_record(tmp_path, dataset_name, problem, error, expected):
    root = _write_voc(tmp_path, [[("a", 2, 2, 9, 9)], [("b", 3, 3, 8, 8)], [("a", 4, 4, 9, 9)]])
    bad = root / "Annotations" / "img1.xml"
    if problem == "broken XML":
        bad.write_text("<annotation><size><width>64</width></annotation>")
    elif problem == "unknown class":
        bad.write_text(bad.read_text().replace("<name>b</name>", "<name>c</name>"))
    else:
        bad.unlink()
    register_voc_dataset(dataset_name, str(root), "train", ["a", "b"])
    with pytest.raises(error) as caught:
        DatasetCatalog.get(dataset_name)
    assert str(caught.value).startswith(f"data set {dataset_name!r}: annotation file {bad} (record 'img1') ")
    assert expected in str(caught.value)
