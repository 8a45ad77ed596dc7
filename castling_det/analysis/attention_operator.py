"""The attention operator alone, on q, k, v laid out as the projection leaves them: its latency
against the two bare matmuls ``q(kᵀv)`` that bound it, its memory, and its error in bf16 and
fp16 against float64 (what ``tools/benchmark.py``'s operator and accuracy tasks and
``tools/profile_attention.py`` measure)."""
import copy
import functools
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..modeling.attention import LinearAngularAttention, SoftmaxAttention, masked_softmax_attention
from ..modeling.blocked_attention import blocked_linear_angular_attention
from .precision import DTYPES, autocast
from .timing import interleaved_median_latency_ms, peak_memory_mib

__all__ = [
    "MATMULS",
    "OPERATOR_PATHS",
    "attention_pair",
    "bench_accuracy",
    "bench_operator",
    "normalised_error",
    "operator_candidates",
    "relative_latencies",
    "token_side",
]

# The baseline every operator is timed against: its two matmuls, nothing else.
MATMULS = "two matmuls q(k^T v)"
# The operators by the names the tools' options give them. "fused" is the deployed default
# (FUSED_DEPLOYED): the native operator on CPU (the blocked one where it cannot be built), the
# Triton kernels on CUDA; "eager" the reference.
OPERATOR_PATHS = {
    "eager": "castling eager",
    "fused": "castling fused",
    "blocked": "castling blocked",  # CPU only: the fused default's fallback, timed beside it
    "compiled": "castling compiled",
    "sdpa": "softmax SDPA",
}


def token_side(tokens: int, option: str) -> int:
    """The side of the square token grid that holds ``tokens`` tokens.

    Raises:
        ValueError: ``tokens`` is not a square number (the message names ``option``).
    """
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{option}={tokens} must be a square number")
    return side


def attention_pair(dim: int, heads: int, device) -> Tuple[LinearAngularAttention, SoftmaxAttention]:
    """Castling-ViT's attention (branch off, as deployed) and its softmax twin, in eval mode."""
    castling = LinearAngularAttention(dim=dim, num_heads=heads, softmax_branch=False)
    softmax = SoftmaxAttention(dim=dim, num_heads=heads)
    return castling.to(device).eval(), softmax.to(device).eval()


def operator_candidates(
    castling: LinearAngularAttention, softmax: SoftmaxAttention, x: torch.Tensor, paths: Sequence[str]
) -> Dict[str, Callable[[], torch.Tensor]]:
    """The operators to compare on the tokens ``x`` (``(1, side, side, dim)``), in ``x``'s dtype:
    :data:`MATMULS` first, then each of ``paths`` (keys of :data:`OPERATOR_PATHS`), all on the
    same q, k, v (the castling module's projection of ``x``). The modules are used through copies
    cast to ``x``'s dtype; call the candidates under ``torch.inference_mode()``."""
    side = x.shape[1]
    castling = copy.deepcopy(castling).to(x.dtype)
    modules = {"sdpa": copy.deepcopy(softmax).to(x.dtype)}
    for path in paths:
        if path not in ("sdpa", "blocked"):  # one copy per Castling module path asked for
            modules[path] = copy.deepcopy(castling)
            modules[path].fused, modules[path].compile_tail = path == "fused", path == "compiled"
    with torch.inference_mode():
        q, k, v = castling._project_qkv(x)
    candidates = {MATMULS: lambda: torch.matmul(q, torch.matmul(k.transpose(-2, -1), v))}
    for path in paths:
        if path == "blocked":
            candidates[OPERATOR_PATHS[path]] = functools.partial(
                blocked_linear_angular_attention, q, k, v, castling.dwconv.weight,
                conv_kind=castling.conv_kind, height=side, width=side,
                linear_weight=castling.linear_weight, eps=castling.eps,
            )
        else:
            candidates[OPERATOR_PATHS[path]] = functools.partial(modules[path].attend, q, k, v, side, side)
    return candidates


def relative_latencies(
    candidates: Dict[str, Callable[[], object]], device, *, warmup: int = 3, repeats: int = 10
) -> List[Tuple[str, float, float]]:
    """``(name, median latency in ms, latency / the first candidate's)`` of each candidate, timed
    in turns (:func:`~castling_det.analysis.timing.interleaved_median_latency_ms`)."""
    latencies = interleaved_median_latency_ms(candidates, device, warmup=warmup, repeats=repeats)
    baseline = next(iter(latencies.values()))
    return [(name, latency, latency / baseline) for name, latency in latencies.items()]


def bench_operator(
    tokens: int, dim: int, heads: int, dtypes: Sequence[str], device, *, compiled: bool = True,
    warmup: int = 2, repeats: int = 5,
) -> List[dict]:
    """Rows of the operator task: per dtype (keys of :data:`DTYPES`), the latency and peak memory
    of :data:`MATMULS`, eager and fused Castling, softmax SDPA (and ``compiled`` Castling), and the peak
    memory of each whole layer (under autocast); then the peak memory of the training-time
    branch (forward and backward, fp32), chunked as configured against naive."""
    side = token_side(tokens, "--operator-tokens")
    castling, softmax = attention_pair(dim, heads, device)
    paths = ["eager", "fused"] + (["blocked"] if torch.device(device).type == "cpu" else []) + ["sdpa"]
    paths += ["compiled"] if compiled else []
    common = {"tokens": tokens, "dim": dim}
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.randn(1, side, side, dim, device=device)
        candidates = operator_candidates(castling, softmax, x.to(dtype), paths)
        with torch.inference_mode():
            latencies = interleaved_median_latency_ms(candidates, device, warmup=warmup, repeats=repeats)
            for name, fn in candidates.items():
                rows.append({"operator": name, "dtype": dtype_name, **common, "latency_ms": latencies[name],
                             "peak_mem_mib": peak_memory_mib(fn, device)})
        for name, layer in (("castling layer", castling), ("softmax layer", softmax)):
            with torch.inference_mode(), autocast(device, dtype):
                memory = peak_memory_mib(lambda: layer(x), device)
            rows.append({"operator": name, "dtype": dtype_name, **common, "peak_mem_mib": memory})

    q, k, v = (torch.randn(1, heads, tokens, dim // heads, device=device, requires_grad=True) for _ in range(3))
    for name, chunk in (("branch train naive", None), ("branch train chunked", castling.branch_chunk_size)):
        def step():
            out, mass = masked_softmax_attention(q, k, v, threshold=0.02, chunk_size=chunk)
            (out.sum() + mass).backward()
        rows.append({"operator": name, "dtype": "fp32", **common, "peak_mem_mib": peak_memory_mib(step, device)})
    return rows


def normalised_error(module: LinearAngularAttention, x: torch.Tensor, dtype: torch.dtype) -> Tuple[float, bool]:
    """Relative Frobenius error of ``module``'s operator at ``dtype`` against float64, and whether
    its output is finite. q, k, v rounded to ``dtype`` feed both, so the error is the operator's
    own, not the projection's."""
    side = x.shape[1]
    reference_module = copy.deepcopy(module).double()
    reference_module.compile_tail = reference_module.fused = False  # the eager reference
    low = copy.deepcopy(module).to(dtype)
    with torch.inference_mode():
        q, k, v = (t.to(dtype) for t in low._project_qkv(x.to(dtype)))
        reference = reference_module.attend(q.double(), k.double(), v.double(), side, side)
        out = low.attend(q, k, v, side, side).double()
    return ((out - reference).norm() / reference.norm()).item(), bool(torch.isfinite(out).all())


def bench_accuracy(
    tokens: int, dim: int, heads: int, large_tokens: int, device, *, compiled: bool = True
) -> List[dict]:
    """Rows of the accuracy task: :func:`normalised_error` in bf16 and fp16 at ``tokens`` tokens
    (eager, fused, and ``compiled``), and in fp16 at ``large_tokens`` (eager and fused). The
    depthwise convolution is zeroed, so the error is that of the normalised sum alone."""
    side = token_side(tokens, "--operator-tokens")
    large_side = token_side(large_tokens, "--large-tokens")
    castling, _ = attention_pair(dim, heads, device)
    with torch.no_grad():
        castling.dwconv.weight.zero_()
    rows = []
    x = torch.randn(1, side, side, dim, device=device)
    large_x = torch.randn(1, large_side, large_side, dim, device=device)
    for path in ["eager", "fused"] + (["compiled"] if compiled else []):
        castling.fused, castling.compile_tail = path == "fused", path == "compiled"
        cases = [(x, tokens, dtype_name) for dtype_name in ("bf16", "fp16")]
        if path != "compiled":  # fp16 is not the compiled form's (its range)
            cases.append((large_x, large_tokens, "fp16"))
        for inputs, num_tokens, dtype_name in cases:
            error, finite = normalised_error(castling, inputs, DTYPES[dtype_name])
            rows.append(
                {"path": path, "dtype": dtype_name, "tokens": num_tokens, "rel_error": error, "finite": finite}
            )
    return rows
