"""tools/convert_weights.py and castling_det.convert: timm, DeiT, MAE and Detectron2 ViT checkpoints,
built here with those libraries' own model classes, converted into Castling-ViT detectors."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone import SimpleFeaturePyramid
from detectron2.modeling.backbone.vit import ViT

from castling_det.convert import convert_checkpoint, fit_pos_embed
from castling_det.engine import CastlingCheckpointer
from conftest import TINY_DEPTH, TINY_EMBED_DIM, TINY_NUM_HEADS, tiny_detector_cfg

REPO = Path(__file__).resolve().parents[1]
PREFIX = "backbone.net."
# The tensors of a softmax-ViT block, named alike in timm, Detectron2 and CastlingViT.
BLOCK_TENSORS = [
    f"{layer}.{kind}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
]
SHARED_KEYS = ["patch_embed.proj.weight", "patch_embed.proj.bias"] + [
    f"blocks.{i}.{name}" for i in range(TINY_DEPTH) for name in BLOCK_TENSORS
]


def _timm_vit(name="vit_tiny_patch16_224", **overrides):
    """A timm model shrunk to the tiny Castling-ViT of conftest (64 wide, 2 blocks, 2 heads)."""
    kwargs = dict(embed_dim=TINY_EMBED_DIM, depth=TINY_DEPTH, num_heads=TINY_NUM_HEADS, img_size=64)
    kwargs.update(overrides)
    return timm.create_model(name, pretrained=False, **kwargs)


def _randomised(state):
    """A state dict with every tensor random, so that a copied zero or one cannot pass for a match."""
    return {key: torch.randn_like(value) for key, value in state.items()}


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _detector(pretrain_img_size=64, **castling):
    cfg = tiny_detector_cfg("GeneralizedRCNN")
    cfg.MODEL.CASTLING.PRETRAIN_IMG_SIZE = pretrain_img_size
    for key, value in castling.items():
        cfg.MODEL.CASTLING[key] = value
    return build_model(cfg)


def _assert_copied(source, converted, source_prefix=""):
    for key in SHARED_KEYS:
        assert torch.equal(converted[PREFIX + key], source[source_prefix + key]), key


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def test_timm_vit_is_copied_tensor_for_tensor(tmp_path):
    state = _randomised(_timm_vit().state_dict())
    converted, report = convert_checkpoint(_save(tmp_path, "vit.pth", state), _detector())

    _assert_copied(state, converted)
    # Same 4x4 grid with a class slot: the position embedding is the source's, exactly.
    assert torch.equal(converted[PREFIX + "pos_embed"], state["pos_embed"])
    for i in range(TINY_DEPTH):
        dwconv = converted[f"{PREFIX}blocks.{i}.attn.dwconv.weight"]
        assert dwconv.shape == (TINY_NUM_HEADS, 1, 3, 1) and not dwconv.any()

    assert report.source_format == "timm"
    # pos_embed, patch_embed (2) and 12 tensors in each of the 2 blocks
    assert len(report.matched) == 1 + 2 + 12 * TINY_DEPTH
    assert report.converted == {}
    assert sorted(report.initialised) == [f"{PREFIX}blocks.{i}.attn.dwconv.weight" for i in range(TINY_DEPTH)]
    assert set(report.dropped) == {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert report.warnings == [] and report.dropped_outside == []
    assert set(converted) == set(report.matched) | set(report.initialised)
    assert report.left_to_model and not any(key.startswith(PREFIX) for key in report.left_to_model)


def test_converted_checkpoint_loads_into_the_detector_through_castling_checkpointer(tmp_path):
    source = _save(tmp_path, "vit.pth", _randomised(_timm_vit().state_dict()))
    converted, _ = convert_checkpoint(source, _detector())
    output = _save(tmp_path, "castling.pth", {"model": converted})
    assert set(torch.load(output, weights_only=True)["model"]) == set(converted)

    torch.manual_seed(1)  # another initialisation than the one converted against
    model = _detector()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    CastlingCheckpointer(model).load(output)

    after = model.state_dict()
    vit_keys = {key for key in after if key.startswith(PREFIX)}
    assert vit_keys == set(converted)
    for key in vit_keys:
        assert torch.equal(after[key], converted[key]), key
    for key in after.keys() - vit_keys:  # pyramid and heads keep the model's own init
        assert torch.equal(after[key], before[key]), key


def test_deit_distilled_keeps_the_class_slot_and_drops_the_distillation_token(tmp_path):
    state = _randomised(_timm_vit("deit_tiny_distilled_patch16_224").state_dict())
    assert state["pos_embed"].shape == (1, 2 + 16, TINY_EMBED_DIM)
    converted, report = convert_checkpoint(_save(tmp_path, "deit.pth", state), _detector())

    _assert_copied(state, converted)
    pos_embed = converted[PREFIX + "pos_embed"]
    assert torch.equal(pos_embed[:, :1], state["pos_embed"][:, :1])
    assert torch.equal(pos_embed[:, 1:], state["pos_embed"][:, 2:])
    assert list(report.converted) == [PREFIX + "pos_embed"]
    assert "1 prefix slot(s) after the class slot dropped" in report.converted[PREFIX + "pos_embed"]
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.dropped)
    assert len(report.dropped) == 8


def test_mae_checkpoint_drops_its_decoder(tmp_path):
    state = _randomised(_timm_vit().state_dict())
    decoder = {
        "mask_token": torch.randn(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, TINY_EMBED_DIM),
        "decoder_pos_embed": torch.randn(1, 17, 32),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, 32),
    }
    checkpoint = {"model": {**state, **decoder}, "epoch": 399}  # as MAE's pre-training saves it
    converted, report = convert_checkpoint(_save(tmp_path, "mae.pth", checkpoint), _detector())

    assert report.source_format == "mae"
    _assert_copied(state, converted)
    assert set(decoder) <= set(report.dropped)
    assert all(report.dropped[key] == "MAE decoder" for key in decoder)
    assert len(report.dropped) == 5 + len(decoder)


def _detectron2_vit(**overrides):
    kwargs = dict(
        img_size=64, patch_size=16, embed_dim=TINY_EMBED_DIM, depth=TINY_DEPTH, num_heads=TINY_NUM_HEADS,
        use_rel_pos=True, window_size=2, window_block_indexes=[0], pretrain_img_size=64,
    )
    kwargs.update(overrides)
    return ViT(**kwargs)


def test_vitdet_detector_checkpoint_drops_relative_positions_and_the_rest_of_the_detector(tmp_path):
    pyramid = SimpleFeaturePyramid(
        net=_detectron2_vit(), in_feature="last_feat", out_channels=32, scale_factors=(2.0, 1.0, 0.5),
        norm="LN",
    )
    state = _randomised({"backbone." + key: value for key, value in pyramid.state_dict().items()})
    converted, report = convert_checkpoint(_save(tmp_path, "vitdet.pth", {"model": state}), _detector())

    assert report.source_format == "detectron2"
    _assert_copied(state, converted, source_prefix=PREFIX)
    assert torch.equal(converted[PREFIX + "pos_embed"], state[PREFIX + "pos_embed"])
    rel_pos = {f"{PREFIX}blocks.{i}.attn.rel_pos_{axis}" for i in range(TINY_DEPTH) for axis in "hw"}
    pyramid_keys = {key for key in state if key.startswith("backbone.simfp_")}
    assert set(report.dropped) == rel_pos
    assert set(report.dropped_outside) == pyramid_keys
    assert len(report.warnings) == len(rel_pos)
    assert all("rel_pos" in warning for warning in report.warnings)


def test_detectron2_vit_without_class_slot_gets_a_zero_one(tmp_path):
    state = _randomised(_detectron2_vit(pretrain_use_cls_token=False).state_dict())
    assert state["pos_embed"].shape == (1, 16, TINY_EMBED_DIM)
    converted, report = convert_checkpoint(_save(tmp_path, "vit.pth", state), _detector())

    assert report.source_format == "detectron2"
    pos_embed = converted[PREFIX + "pos_embed"]
    assert not pos_embed[:, 0].any()
    assert torch.equal(pos_embed[:, 1:], state["pos_embed"])
    assert report.converted == {PREFIX + "pos_embed": "class slot added as zeros"}


def test_missing_qkv_bias_starts_at_zero(tmp_path):
    state = _randomised(_timm_vit(qkv_bias=False).state_dict())
    converted, report = convert_checkpoint(_save(tmp_path, "vit.pth", state), _detector())
    for i in range(TINY_DEPTH):
        key = f"{PREFIX}blocks.{i}.attn.qkv.bias"
        assert not converted[key].any()
        assert report.initialised[key] == "zeros: the source layer has no bias"
        weight = f"blocks.{i}.attn.qkv.weight"
        assert torch.equal(converted[PREFIX + weight], state[weight])


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------
def _linear_pos_embed(grid, width=4):
    """(1, 1 + grid², width): a class slot of 7s, then channel c = (c + 1)·row − 2·col + c."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    channels = torch.arange(width, dtype=torch.float32)
    patches = (channels + 1) * rows[..., None] - 2 * cols[..., None] + channels
    return torch.cat([torch.full((1, 1, width), 7.0), patches.reshape(1, grid * grid, width)], dim=1)


# Enlarging keeps a linear function exactly linear; shrinking, whose anti-aliasing filter is sampled
# at whole source cells, to about 1% of its steepest slope (4 per cell).
@pytest.mark.parametrize(
    "source_grid, target_grid, interior, atol", [(8, 12, range(3, 10), 1e-4), (16, 10, range(2, 8), 0.04)]
)
def test_resized_linear_pos_embed_stays_linear_inside_the_grid(source_grid, target_grid, interior, atol):
    resized, note = fit_pos_embed(_linear_pos_embed(source_grid), 1, target_grid)
    assert resized.shape == (1, 1 + target_grid**2, 4)
    assert f"grid {source_grid}x{source_grid} resized to {target_grid}x{target_grid}" in note
    assert torch.equal(resized[:, 0], torch.full((1, 4), 7.0))

    # Target cell j samples the source at (j + 0.5)·s/t − 0.5 (half-pixel centres, as
    # align_corners=False); away from the border, where the filter sees no padding, a linear
    # function must come out linear.
    coords = (torch.arange(target_grid) + 0.5) * source_grid / target_grid - 0.5
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    channels = torch.arange(4, dtype=torch.float32)
    expected = (channels + 1) * rows[..., None] - 2 * cols[..., None] + channels
    grid = resized[0, 1:].reshape(target_grid, target_grid, 4)
    inside = (slice(interior.start, interior.stop),) * 2
    torch.testing.assert_close(grid[inside], expected[inside], atol=atol, rtol=0)
    # ... and stay close to it everywhere (the border replicates the edge pixels).
    assert (grid - expected).abs().max() < 0.25 * source_grid


def test_same_grid_pos_embed_is_an_exact_copy():
    pos_embed = torch.randn(1, 1 + 36, 8)
    resized, note = fit_pos_embed(pos_embed, 1, 6)
    assert torch.equal(resized, pos_embed) and note == ""


def test_conversion_to_another_pretraining_size_resizes_the_pos_embed(tmp_path):
    state = _randomised(_timm_vit().state_dict())
    converted, report = convert_checkpoint(_save(tmp_path, "vit.pth", state), _detector(pretrain_img_size=96))
    assert converted[PREFIX + "pos_embed"].shape == (1, 1 + 36, TINY_EMBED_DIM)
    assert report.converted == {PREFIX + "pos_embed": "grid 4x4 resized to 6x6 (bicubic)"}
    assert len(report.matched) == 2 + 12 * TINY_DEPTH


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        convert_checkpoint(missing, _detector())


def test_unknown_format_is_named(tmp_path):
    path = _save(tmp_path, "resnet.pth", {"model": {"conv1.weight": torch.randn(8, 3, 7, 7)}})
    with pytest.raises(ValueError, match=r"cannot tell the format of .*resnet\.pth.*conv1\.weight"):
        convert_checkpoint(path, _detector())


def test_file_that_needs_unpickling_code_is_refused_with_advice(tmp_path):
    checkpoint = {"model": _timm_vit().state_dict(), "args": argparse.Namespace(lr=1e-3)}
    path = _save(tmp_path, "mae_train.pth", checkpoint)
    with pytest.raises(ValueError, match=r"mae_train\.pth.*weights_only=True(.|\n)*re-save its tensors"):
        convert_checkpoint(path, _detector())


def test_wrong_source_format_is_named(tmp_path):
    pyramid_state = {"backbone.net." + key: value for key, value in _detectron2_vit().state_dict().items()}
    path = _save(tmp_path, "vitdet.pth", {"model": pyramid_state})
    with pytest.raises(ValueError, match=r"read as a timm checkpoint has no 'patch_embed\.proj\.weight'"):
        convert_checkpoint(path, _detector(), source="timm")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(embed_dim=96), r"'patch_embed\.proj\.weight'.*\(96, 3, 16, 16\).*\(64, 3, 16, 16\).*width"),
        (dict(patch_size=8), r"'patch_embed\.proj\.weight'.*\(64, 3, 8, 8\).*\(64, 3, 16, 16\).*patch size"),
        (dict(depth=3), r"depth mismatch: .* has 3 blocks \(blocks\.0 to blocks\.2\), the target has 2"),
        (dict(mlp_ratio=2.0), r"'blocks\.0\.mlp\.fc1\.weight'.*\(128, 64\).*\(256, 64\).*MLP_RATIO"),
    ],
)
def test_layout_mismatch_names_the_key_and_both_shapes(tmp_path, overrides, message):
    path = _save(tmp_path, "vit.pth", _timm_vit(**overrides).state_dict())
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(path, _detector())


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def test_cli_converts_for_the_shapes_config(tmp_path):
    vit_ti = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    source = _save(tmp_path, "vit_ti.pth", vit_ti.state_dict())
    output = tmp_path / "out" / "castling.pth"
    cmd = [
        sys.executable, str(REPO / "tools" / "convert_weights.py"),
        "--input", source, "--output", str(output),
        "--config-file", str(REPO / "configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml"),
        "MODEL.CASTLING.DEPTH", "2", "MODEL.CASTLING.PRETRAIN_IMG_SIZE", "192",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    assert "| converted | backbone.net.pos_embed" in result.stdout
    assert "grid 14x14 resized to 12x12 (bicubic)" in result.stdout
    assert "(timm): 26 matched, 1 converted," in result.stdout
    saved = torch.load(output, weights_only=True)
    assert set(saved) == {"model"} and len(saved["model"]) == 1 + 2 + 13 * 2
    assert saved["model"][PREFIX + "pos_embed"].shape == (1, 1 + 144, 192)


def test_cli_reports_a_bad_input_and_exits(tmp_path):
    from castling_det.commands import convert_weights

    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_detector_cfg("GeneralizedRCNN").dump())
    message = r"convert_weights: error: checkpoint '.*absent\.pth' does not exist"
    with pytest.raises(SystemExit, match=message):
        convert_weights.main(
            ["--input", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o.pth"),
             "--config-file", str(config)]
        )
    assert not (tmp_path / "o.pth").exists()
