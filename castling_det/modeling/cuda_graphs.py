"""CUDA graphs of the deployed backbone: one captured per input shape, replayed after that.

A ViT-B forward at 1024² on a current GPU is a few hundred small kernels whose launches cost
about as much as their work (most of the deployed operator's time on an H200 was launch and
guard overhead). A CUDA graph replays all of them with one launch.

What a graph fixes at capture, and how :class:`ShapeGraphs` keeps replays correct:

- Addresses. The input is copied into a static buffer before each replay, and the outputs are
  cloned out of the graph's memory after it, so callers never hold memory the next replay
  overwrites. Parameters are read at their addresses: loading weights in place (as Detectron2's
  checkpointer does) is seen by later replays; moving or casting the module makes new tensors,
  so the owner drops its graphs then (:meth:`ShapeGraphs.clear`).
- Shapes and dtypes. One graph per (shape, dtype, device, autocast dtype): a detector that
  resizes images keeps one graph per size it meets, all sharing one memory pool (safe because
  replays run one at a time on one stream and their outputs are cloned at once).
- Autocast. Capture runs with autocast's weight-cast cache off: a cached cast would be a tensor
  the graph reads after the autocast region that made it has freed it.
"""
from typing import Callable, Dict, Tuple

import torch

__all__ = ["ShapeGraphs"]

# Eager runs on the capture stream before capturing: Triton compiles its kernels, cuBLAS picks
# its algorithms and the caching allocator holds the blocks the capture will use.
_WARMUP_RUNS = 3


class ShapeGraphs:
    """The CUDA graphs of one function ``(B, C, H, W) tensor -> dict of tensors``: calling
    ``graphs(forward, x)`` captures ``forward`` on the first input of each shape and replays the
    capture after that. ``forward`` must be capturable (no host synchronisation, no
    data-dependent shapes) and the same function at every call; it runs with gradients off.
    """

    def __init__(self):
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, Dict[str, torch.Tensor]]] = {}
        self._pool = None

    def __deepcopy__(self, memo) -> "ShapeGraphs":
        # A copied module has parameters of its own: it captures its graphs anew.
        return ShapeGraphs()

    def __len__(self) -> int:
        """Number of graphs captured (one per input shape and dtype met)."""
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its memory (after the module's parameters move or change dtype)."""
        self._graphs.clear()
        self._pool = None

    def __call__(self, forward: Callable[[torch.Tensor], Dict[str, torch.Tensor]], x: torch.Tensor):
        autocast_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x.shape), x.dtype, x.device, autocast_dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(forward, x, autocast_dtype)
        graph, static_input, static_outputs = self._graphs[key]
        static_input.copy_(x)
        graph.replay()
        return {name: out.clone() for name, out in static_outputs.items()}

    # Outside inference mode: its tensors could not be written (the static input) or used
    # (the outputs) by a replay called without it.
    @torch.inference_mode(False)
    def _capture(self, forward, x: torch.Tensor, autocast_dtype):
        static_input = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        autocast = torch.autocast(
            "cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
            cache_enabled=False,
        )
        with torch.no_grad(), autocast:
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_RUNS):
                    forward(static_input)
            # The same stream for warm-up and capture: libraries' per-stream handles already exist.
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                static_outputs = forward(static_input)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        return graph, static_input, static_outputs
