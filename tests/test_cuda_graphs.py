"""Tests of the CUDA-graph mode of the deployed backbone (MODEL.CASTLING.CUDA_GRAPHS).

The graphs themselves need a CUDA GPU: those tests skip without one. The rest (the config key,
the CPU fallback, dropping graphs when the module is copied or moved) run everywhere."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from castling_det import CastlingViT, add_castling_config, set_softmax_branch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _vit(**kwargs):
    torch.manual_seed(0)
    vit = CastlingViT(
        embed_dim=64, depth=3, num_heads=2, out_features=("block1", "last_feat"), cuda_graphs=True,
        softmax_branch=False, **kwargs,
    )
    return vit.eval()


def test_config_key_reaches_the_backbone():
    cfg = get_cfg()
    add_castling_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_castling_vit_fpn_backbone"
    cfg.MODEL.CASTLING.update(EMBED_DIM=64, DEPTH=2, NUM_HEADS=2)
    cfg.MODEL.FPN.IN_FEATURES = ["last_feat"]
    assert not build_backbone(cfg, ShapeSpec(channels=3)).net.cuda_graphs  # off by default
    cfg.MODEL.CASTLING.CUDA_GRAPHS = True
    assert build_backbone(cfg, ShapeSpec(channels=3)).net.cuda_graphs


def test_cpu_input_runs_eagerly():
    vit = _vit()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = vit(x)
        vit.cuda_graphs = False
        expected = vit(x)
    assert len(vit._graphs) == 0
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)


def test_copies_and_moves_drop_captured_graphs():
    vit = _vit()
    vit._graphs._graphs["stand-in"] = (None, None, {})  # as if a shape had been captured
    assert len(copy.deepcopy(vit)._graphs) == 0  # a copy has parameters of its own
    assert len(vit._graphs) == 1
    vit.to(torch.float64)  # new parameter tensors: the graph would read the old ones
    assert len(vit._graphs) == 0


@needs_cuda
def test_graphs_replay_the_eager_forward_once_per_shape():
    vit = _vit().cuda()
    eager = copy.deepcopy(vit)
    eager.cuda_graphs = False
    with torch.no_grad():
        for shape in [(2, 3, 64, 96), (1, 3, 80, 48), (2, 3, 64, 96)]:
            x = torch.randn(*shape, device="cuda")
            out, expected = vit(x), eager(x)
            for name in expected:
                torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-5)
    assert len(vit._graphs) == 2  # the third input reused the first shape's graph


@needs_cuda
def test_outputs_are_the_callers_and_weights_are_read_at_replay():
    vit = _vit().cuda()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad():
        first = vit(x)
        kept = first["last_feat"].clone()
        second = vit(x)  # a replay must not write into what the first call returned
        torch.testing.assert_close(first["last_feat"], kept, rtol=0, atol=0)
        assert second["last_feat"].data_ptr() != first["last_feat"].data_ptr()
        vit.blocks[-1].mlp.fc2.bias.add_(1.0)  # in place, as a checkpoint loads
        changed = vit(x)
        vit.cuda_graphs = False
        torch.testing.assert_close(changed["last_feat"], vit(x)["last_feat"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed["last_feat"], kept)


@needs_cuda
def test_autocast_bf16_capture_matches_eager_autocast():
    vit = _vit().cuda()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = vit(x)["last_feat"]
        again = vit(x)["last_feat"]
        vit.cuda_graphs = False
        expected = vit(x)["last_feat"]
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


@needs_cuda
def test_training_gradients_or_the_branch_run_eagerly():
    vit = _vit().cuda()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    vit(x)  # gradients on
    with torch.no_grad():
        set_softmax_branch(vit, True)
        vit.blocks[0].attn.branch_at_inference = True
        vit(x)
    vit.train()
    vit(x)
    assert len(vit._graphs) == 0

