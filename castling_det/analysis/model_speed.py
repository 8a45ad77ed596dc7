"""Latency, peak memory and GMACs of whole models built from configs, measured alike for every
variant (what ``tools/benchmark.py``'s backbone and detector tasks measure)."""
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis
from torch import nn
from tqdm import tqdm

from ..config import load_castling_config
from ..modeling.branch import set_softmax_branch
from .flops import count_gflops, with_attention_handles
from .precision import DTYPES, autocast
from .timing import interleaved_median_latency_ms, peak_memory_mib

__all__ = ["bench_backbones", "bench_detectors", "build_deployed_variant", "eager_attention", "vit_gmacs"]


def build_deployed_variant(config_file: str, opts: Sequence[str], device: str) -> nn.Module:
    """The detector of ``config_file`` as deployed: eval mode, softmax branch off, random weights,
    and every score threshold 0, so that every variant's heads work on the same number of
    detections (``TEST.DETECTIONS_PER_IMAGE``).

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
    """
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = load_castling_config(config_file, list(opts), device=device)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    set_softmax_branch(model, False)
    return model


@contextmanager
def eager_attention(model: nn.Module):
    """Inside, every attention of ``model`` set to compile its tail runs eagerly instead.

    fvcore counts through ``torch.jit.trace``, which cannot enter ``torch.compile``: a compiled
    model is counted as its eager twin, which runs the same operations.
    """
    compiled = [m for m in model.modules() if getattr(m, "compile_tail", False)]
    for module in compiled:
        module.compile_tail = False
    try:
        yield
    finally:
        for module in compiled:
            module.compile_tail = True


def vit_gmacs(vit: nn.Module, image: torch.Tensor) -> Dict[str, float]:
    """``{"gmacs": ..., "floor_gmacs": ...}``: fvcore GMACs of the ViT on ``image`` (attention
    included) and of its linear layers and patch embedding alone, the floor no attention can
    go below."""
    counter = with_attention_handles(FlopCountAnalysis(vit, (image,)))
    with eager_attention(vit):
        by_module = counter.by_module()
    linear = [name for name, module in vit.named_modules() if isinstance(module, nn.Linear)]
    floor = sum(by_module[name] for name in linear) + by_module["patch_embed"]
    return {"gmacs": counter.total() / 1e9, "floor_gmacs": floor / 1e9}


def bench_backbones(
    models: Mapping[str, nn.Module], sizes: Sequence[int], dtypes: Sequence[str], device: torch.device, *,
    max_sizes: Optional[Mapping[str, int]] = None, warmup: int = 2, repeats: int = 5,
) -> List[dict]:
    """The ViT (``backbone.net``) of each model on square random images of each of ``sizes``, in
    each of ``dtypes`` (autocast): latency, peak memory, and :func:`vit_gmacs`. At each size and
    dtype the variants are timed in turns (:func:`interleaved_median_latency_ms`), so their ratios
    are side by side. A variant's sizes above its ``max_sizes`` entry are skipped. Each row is
    written under a progress bar."""
    rows = []
    progress = tqdm(total=len(sizes) * len(dtypes), desc="backbone", unit="size x dtype")
    for size in sizes:
        image = torch.randn(1, 3, size, size, device=device)
        vits = {}
        for name, model in models.items():
            if size > (max_sizes or {}).get(name, size):
                tqdm.write(f"backbone {name} {size}: skipped (above its maximum size)")
            else:
                vits[name] = model.backbone.net
        with torch.inference_mode():
            flops = {name: vit_gmacs(vit, image) for name, vit in vits.items()}
        for dtype_name in dtypes:
            def forward(vit):
                def call():
                    with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                        vit(image)
                return call
            calls = {name: forward(vit) for name, vit in vits.items()}
            latencies = interleaved_median_latency_ms(calls, device, warmup=warmup, repeats=repeats)
            for name, vit in vits.items():
                row = {"variant": name, "dtype": dtype_name, "size": size,
                       "tokens": (size // vit.patch_size) ** 2, "latency_ms": latencies[name],
                       "peak_mem_mib": peak_memory_mib(calls[name], device), **flops[name]}
                tqdm.write(f"backbone {row}")
                rows.append(row)
            progress.update()
    progress.close()
    return rows


def bench_detectors(
    models: Mapping[str, nn.Module], sizes: Sequence[int], dtypes: Sequence[str], device: torch.device, *,
    warmup: int = 2, repeats: int = 5,
) -> List[dict]:
    """Each whole detector on square random images of each of ``sizes``, in each of ``dtypes``:
    latency, peak memory and GMACs, and where the time goes: the ViT alone (``vit_ms``) and with
    its feature pyramid (``vit_pyramid_ms``); the rest is the RPN, ROI heads and
    post-processing. Each of the three is timed for the variants in turns, as in
    :func:`bench_backbones`. Each row is written under a progress bar."""
    rows = []
    progress = tqdm(total=len(sizes) * len(dtypes), desc="detector", unit="size x dtype")
    for size in sizes:
        image = torch.randint(0, 256, (3, size, size), device=device).float()
        inputs = [{"image": image, "height": size, "width": size}]
        normalized = {name: ((image - m.pixel_mean) / m.pixel_std)[None] for name, m in models.items()}
        gmacs = {}
        for name, model in models.items():
            with eager_attention(model):
                gmacs[name] = count_gflops(model, inputs, modules=())["model"]
        for dtype_name in dtypes:
            def run(fn, *fn_args):
                def call():
                    with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                        fn(*fn_args)
                return call
            stages = {
                "latency_ms": {name: run(model, inputs) for name, model in models.items()},
                "vit_ms": {name: run(m.backbone.net, normalized[name]) for name, m in models.items()},
                "vit_pyramid_ms": {name: run(m.backbone, normalized[name]) for name, m in models.items()},
            }
            timed = {
                stage: interleaved_median_latency_ms(calls, device, warmup=warmup, repeats=repeats)
                for stage, calls in stages.items()
            }
            for name in models:
                row = {"variant": name, "dtype": dtype_name, "size": size, "latency_ms": timed["latency_ms"][name],
                       "peak_mem_mib": peak_memory_mib(stages["latency_ms"][name], device), "gmacs": gmacs[name],
                       "vit_ms": timed["vit_ms"][name], "vit_pyramid_ms": timed["vit_pyramid_ms"][name]}
                tqdm.write(f"detector {row}")
                rows.append(row)
            progress.update()
    progress.close()
    return rows
