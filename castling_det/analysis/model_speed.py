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
from .timing import latency_and_peak_memory, median_latency_ms

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
    each of ``dtypes`` (autocast): latency, peak memory, and :func:`vit_gmacs`. A variant's sizes
    above its ``max_sizes`` entry are skipped. Each row is written under a progress bar."""
    rows = []
    progress = tqdm(total=len(models) * len(sizes), desc="backbone", unit="size")
    for name, model in models.items():
        vit = model.backbone.net
        for size in sizes:
            if size > (max_sizes or {}).get(name, size):
                tqdm.write(f"backbone {name} {size}: skipped (above its maximum size)")
                progress.update()
                continue
            image = torch.randn(1, 3, size, size, device=device)
            with torch.inference_mode():
                flops = vit_gmacs(vit, image)
            for dtype_name in dtypes:
                def run():
                    with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                        vit(image)
                timing = latency_and_peak_memory(run, device, warmup=warmup, repeats=repeats)
                row = {"variant": name, "dtype": dtype_name, "size": size,
                       "tokens": (size // vit.patch_size) ** 2, **timing, **flops}
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
    post-processing. Each row is written under a progress bar."""
    rows = []
    progress = tqdm(total=len(models) * len(sizes), desc="detector", unit="size")
    for name, model in models.items():
        for size in sizes:
            image = torch.randint(0, 256, (3, size, size), device=device).float()
            inputs = [{"image": image, "height": size, "width": size}]
            normalized = ((image - model.pixel_mean) / model.pixel_std)[None]
            with eager_attention(model):
                gmacs = count_gflops(model, inputs, modules=())["model"]
            for dtype_name in dtypes:
                def run(fn, *fn_args):
                    def call():
                        with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                            fn(*fn_args)
                    return call
                timing = latency_and_peak_memory(run(model, inputs), device, warmup=warmup, repeats=repeats)
                row = {"variant": name, "dtype": dtype_name, "size": size, **timing, "gmacs": gmacs}
                for stage, module in (("vit_ms", model.backbone.net), ("vit_pyramid_ms", model.backbone)):
                    row[stage] = median_latency_ms(run(module, normalized), device, warmup=warmup, repeats=repeats)
                tqdm.write(f"detector {row}")
                rows.append(row)
            progress.update()
    progress.close()
    return rows
