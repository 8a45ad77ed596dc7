"""Export of deployed detectors to TorchScript and ONNX, checked against eager (part of issue #6)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image

from castling_det import set_branch_scale, softmax_branch
from castling_det.engine import CastlingCheckpointer
from castling_det.export import (
    build_tracing_adapter,
    compare_instances,
    compare_on_images,
    export_onnx,
    export_torchscript,
    fixed_input_grid_warning,
    load_exported,
    prepare_for_export,
)
from castling_det.modeling import branch_modules

REPO = Path(__file__).resolve().parents[1]
BOX_TOL = 1e-3
# The tracing warnings name every Python branch on a shape; the tests check the outcome instead.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning")


def _image(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


# Traced on the first; the second has another size and another token grid.
TRACE_IMAGE = _image(128, 160, seed=1)
OTHER_IMAGE = _image(96, 200, seed=2)


KINDS = ["faster_rcnn", "mask_rcnn", "cascade_mask_rcnn", "retinanet"]


def _detector_cfg(make_detector_cfg, kind):
    """A tiny detector whose every candidate box is kept: score threshold 0 and room for all
    (20 proposals x 3 classes), so no near-tied score decides what is cut; and a branch threshold
    of 0, so that the softmax branch changes the output when on."""
    if kind == "retinanet":
        cfg = make_detector_cfg("RetinaNet")
    else:
        cfg = make_detector_cfg("GeneralizedRCNN", mask_on=kind.endswith("mask_rcnn"))
    if kind == "cascade_mask_rcnn":
        cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
        cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.MODEL.CASTLING.BRANCH.RELATIVE_THRESHOLD = 0.0  # the default relative mask keeps every weight
    return cfg


def _deployed(make_detector_cfg, kind="mask_rcnn"):
    torch.manual_seed(0)
    return prepare_for_export(build_model(_detector_cfg(make_detector_cfg, kind)))


def _assert_matches(comparisons):
    for c in comparisons:
        assert c.num_eager > 0
        assert c.matches(BOX_TOL), c


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_matches_eager_at_the_traced_and_another_size(make_detector_cfg, tmp_path, kind):
    model = _deployed(make_detector_cfg, kind)
    export_torchscript(build_tracing_adapter(model, TRACE_IMAGE), TRACE_IMAGE, str(tmp_path / "model.ts"))
    # From the file, not the traced object, against a fresh adapter, as in another process.
    exported = load_exported(str(tmp_path / "model.ts"))
    fresh_adapter = build_tracing_adapter(model, TRACE_IMAGE)
    _assert_matches(compare_on_images(fresh_adapter, exported, [TRACE_IMAGE, OTHER_IMAGE]))


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_in_onnxruntime_matches_eager_at_the_traced_and_another_size(make_detector_cfg, tmp_path, kind):
    adapter = build_tracing_adapter(_deployed(make_detector_cfg, kind), TRACE_IMAGE)
    export_onnx(adapter, TRACE_IMAGE, str(tmp_path / "model.onnx"))
    exported = load_exported(str(tmp_path / "model.onnx"))
    _assert_matches(compare_on_images(adapter, exported, [TRACE_IMAGE, OTHER_IMAGE]))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    masks = ["pred_masks"] if kind.endswith("mask_rcnn") else []
    assert [o.name for o in session.get_outputs()] == [
        "pred_boxes", "pred_classes", *masks, "scores", "image_size"
    ]


def test_the_exported_model_has_the_branch_off(make_detector_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(_detector_cfg(make_detector_cfg, "mask_rcnn"))
    # Built with the branch on. Its share of the attention sum is tiny at random init, so it is
    # scaled up: were it exported on, the boxes would move by about 1e-3 px instead of 2e-4.
    set_branch_scale(model, 100.0)
    prepare_for_export(model)
    assert all(not m.softmax_branch for m in branch_modules(model))
    adapter = build_tracing_adapter(model, TRACE_IMAGE)
    exported = export_torchscript(adapter, TRACE_IMAGE, str(tmp_path / "model.ts"))
    with torch.no_grad():
        from_exported = adapter.outputs_schema(exported(TRACE_IMAGE))[0]["instances"]
        with softmax_branch(model, True):
            branch_on = adapter.outputs_schema(adapter(TRACE_IMAGE))[0]["instances"]
        branch_off = adapter.outputs_schema(adapter(TRACE_IMAGE))[0]["instances"]
    assert compare_instances(branch_off, from_exported).max_box_diff <= 1e-5
    assert compare_instances(branch_on, from_exported).max_box_diff > 1e-4


def test_prepare_for_export_switches_off_the_compiled_tail(make_detector_cfg, tmp_path):
    cfg = _detector_cfg(make_detector_cfg, "faster_rcnn")
    cfg.MODEL.CASTLING.COMPILE_TAIL = True
    model = prepare_for_export(build_model(cfg))
    assert all(not m.compile_tail for m in branch_modules(model))
    # torch.jit.trace refuses a torch.compile'd function: this raises if the tail stayed on.
    export_torchscript(build_tracing_adapter(model, TRACE_IMAGE), TRACE_IMAGE, str(tmp_path / "model.ts"))


def test_tracing_on_the_position_embedding_grid_fixes_the_input_size(make_detector_cfg, tmp_path):
    # PRETRAIN_IMG_SIZE 224 and 16-pixel patches: a 224 x 224 input is the embedding's own
    # 14 x 14 grid, where it is not interpolated; traced there, other grids fail.
    model = _deployed(make_detector_cfg, "faster_rcnn")
    grid_image = _image(224, 224, seed=3)
    adapter = build_tracing_adapter(model, grid_image)
    assert "14x14" in fixed_input_grid_warning(adapter, grid_image)
    assert fixed_input_grid_warning(adapter, TRACE_IMAGE) is None
    exported = export_torchscript(adapter, grid_image, str(tmp_path / "model.ts"))
    _assert_matches(compare_on_images(adapter, exported, [grid_image]))
    with pytest.raises(RuntimeError, match="get_abs_pos"):  # the embedding, fixed at 14 x 14
        exported(OTHER_IMAGE)


def _instances(boxes, scores, classes):
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.tensor(classes)
    return instances


def test_compare_instances_pairs_reordered_detections_and_sees_differences():
    eager = _instances([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9]], [0.9, 0.5, 0.5], [0, 1, 1])
    reordered = _instances([[1, 1, 9, 9], [0, 0, 10, 10], [5, 5, 20, 20]], [0.5, 0.9, 0.5], [1, 0, 1])
    assert compare_instances(eager, reordered).matches(BOX_TOL)

    moved = _instances([[1, 1, 9, 9], [0, 0, 10, 10.01], [5, 5, 20, 20]], [0.5, 0.9, 0.5], [1, 0, 1])
    comparison = compare_instances(eager, moved)
    assert comparison.max_box_diff == pytest.approx(0.01, abs=1e-5) and not comparison.matches(BOX_TOL)

    other_class = _instances([[1, 1, 9, 9], [0, 0, 10, 10], [5, 5, 20, 20]], [0.5, 0.9, 0.5], [1, 2, 1])
    assert compare_instances(eager, other_class).num_unmatched == 1

    rescored = _instances([[1, 1, 9, 9], [0, 0, 10, 10], [5, 5, 20, 20]], [0.5, 0.8, 0.5], [1, 0, 1])
    assert not compare_instances(eager, rescored).matches(BOX_TOL)
    assert not compare_instances(eager, eager[:2]).matches(BOX_TOL)


def test_bad_inputs_of_the_library_name_the_culprit(make_detector_cfg, tmp_path):
    model = _deployed(make_detector_cfg, "faster_rcnn")
    with pytest.raises(ValueError, match=r"\(3, H, W\) image, got shape \(128, 160\)"):
        build_tracing_adapter(model, TRACE_IMAGE[0])
    with pytest.raises(FileNotFoundError, match="missing.ts"):
        load_exported(str(tmp_path / "missing.ts"))
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.pt.*\.ts .*\.onnx"):
        load_exported(str(tmp_path / "model.pt"))


# --------------------------------------------------------------------------------------------
# tools/export_model.py
# --------------------------------------------------------------------------------------------
def _load_tool():
    """The export tool's module (tools/export_model.py and castling-export run its code)."""
    from castling_det.commands import export_model

    return export_model


@pytest.fixture
def tool_files(make_detector_cfg, tmp_path):
    """A tiny Mask R-CNN's config file, weights and a sample image, as the tool reads them."""
    cfg = _detector_cfg(make_detector_cfg, "mask_rcnn")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 160
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    torch.manual_seed(0)
    CastlingCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("weights")
    image_file = tmp_path / "sample.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)).save(image_file)
    return {"config": str(config_file), "weights": str(tmp_path / "weights.pth"), "image": str(image_file)}


@pytest.mark.parametrize(
    "options, overrides, with_sample, message",
    [
        (["--format", "tflite"], [], True, "invalid choice: 'tflite'"),
        ([], ["MODEL.WEIGHTS", "/no/such/model_final.pth"], True,
         "MODEL.WEIGHTS '/no/such/model_final.pth': no such file"),
        ([], ["MODEL.WEIGHTS", ""], True, "MODEL.WEIGHTS is empty"),
        (["--sample-image", "/no/such/image.png"], [], True,
         "--sample-image '/no/such/image.png': no such file"),
        ([], ["DATASETS.TEST", "()"], False,
         "DATASETS.TEST is empty: register a test set or give --sample-image"),
    ],
)
def test_the_tool_refuses_bad_input_with_a_clear_error(
    tool_files, tmp_path, capsys, options, overrides, with_sample, message
):
    sample = ["--sample-image", tool_files["image"]] if with_sample else []
    argv = [
        "--config-file", tool_files["config"], "--output", str(tmp_path / "out"), *sample, *options,
        "MODEL.WEIGHTS", tool_files["weights"], *overrides,  # the later MODEL.WEIGHTS wins
    ]
    with pytest.raises(SystemExit) as exit_info:
        _load_tool().main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.ts").exists()


def test_the_tool_exports_and_verifies_both_formats_from_the_command_line(tool_files, tmp_path):
    out = tmp_path / "export"
    cmd = [
        sys.executable, str(REPO / "tools" / "export_model.py"), "--config-file", tool_files["config"],
        "--output", str(out), "--sample-image", tool_files["image"], "--verify",
        "MODEL.WEIGHTS", tool_files["weights"],
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for name in ("model.ts", "model.onnx"):
        assert (out / name).is_file()
        assert f"{out / name}: max box difference" in log and "MATCHES eager" in log
    assert "DIFFERS" not in log
