"""Replay the greedy loops on CUDA as one CUDA graph per input shape.

A greedy scorer issues a few dozen small kernels per kept token (``_greedy``, ``divprune``), so on
a GPU its time is launch latency, not arithmetic. :func:`run_graphed` captures the whole loop of
one input signature (function, tensor shapes/dtypes/device, ``k``) into a ``torch.cuda.CUDAGraph``
and replays it for later calls with that signature: one graph launch per call instead of one
launch per operator. A replay runs the captured kernels themselves, so it computes the numbers
the eager loop computes on that GPU (same picks).

Policy:

* CUDA only. On the CPU, while another graph is being captured on this stream (the loop is then
  simply part of that graph), under ``torch.compile`` tracing, or with
  ``TOKENPRUNE_GREEDY_CUDA_GRAPHS=0``, the function runs eagerly.
* A signature is captured the second time it is seen (the first call runs eagerly), so one-off
  shapes never pay for a capture. The call that captures also runs eagerly for its own answer.
* Each graph keeps static input buffers and a private memory pool; all graphs together stay under
  ``TOKENPRUNE_GREEDY_GRAPH_MB`` (default 256 MiB, least recently used evicted first). The vLLM
  integration allocates that much once inside vLLM's start-up memory profile (the scorer sweep,
  ``models/encoder_budget.py``), so the KV cache is sized with room for it.
* A failed capture is logged once and turns graphs off for the process (eager from then on).
* No host synchronisation: capture uses ``CUDAGraph.capture_begin`` directly (the
  ``torch.cuda.graph`` context manager would synchronise the device and empty the cache), and a
  replay is input copies, one graph launch and an output copy, all on the current stream.

Not yet run on a GPU (no GPU was available to the task that wrote it); the CUDA tests in
``tests/test_scoring_greedy_ops.py`` check picks and launch counts where one is present.
Worker process (wherever the scorers run); pure torch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vllm_tokenprune.log import logger_name

__all__ = ["GRAPHS_ENV", "GRAPH_MB_ENV", "clear_graphs", "graph_count", "graph_memory_budget",
           "run_graphed"]

logger = logging.getLogger(logger_name(__name__))

GRAPHS_ENV = "TOKENPRUNE_GREEDY_CUDA_GRAPHS"
GRAPH_MB_ENV = "TOKENPRUNE_GREEDY_GRAPH_MB"
_SEEN_MAX = 256  # signatures remembered as "seen once"

_lock = threading.Lock()
_graphs: OrderedDict[tuple, _Graph] = OrderedDict()
_seen: OrderedDict[tuple, None] = OrderedDict()
_failed = False


class _Graph:
    """One captured call: static inputs, the graph, and its output tensor."""

    def __init__(self, fn: Callable[..., Tensor], args: Sequence[Tensor | None], static: tuple):
        device = next(a for a in args if a is not None).device
        self.inputs = [None if a is None else torch.empty_like(a) for a in args]
        reserved = torch.cuda.memory_reserved(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the empty_like allocations
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.stream(stream):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.output = fn(*self.inputs, *static)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = torch.cuda.memory_reserved(device) - reserved
        self.nbytes = pool + sum(a.nbytes for a in self.inputs if a is not None)

    def __call__(self, args: Sequence[Tensor | None]) -> Tensor:
        for dst, src in zip(self.inputs, args, strict=True):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.output.clone()


def _budget() -> int:
    return int(float(os.environ.get(GRAPH_MB_ENV, "256")) * (1 << 20))


def graph_memory_budget() -> int:
    """Bytes the captured graphs may hold at most (0 when graphs are switched off): what the
    vLLM integration sets aside inside the start-up memory profile."""
    return 0 if os.environ.get(GRAPHS_ENV, "1") == "0" else _budget()


def _eager_only(args: Sequence[Tensor | None]) -> bool:
    x = args[0]
    assert x is not None
    return (
        x.device.type != "cuda"
        or _failed
        or os.environ.get(GRAPHS_ENV, "1") == "0"
        or torch.compiler.is_compiling()
        or torch.cuda.is_current_stream_capturing()
    )


def run_graphed(
    fn: Callable[..., Tensor], args: Sequence[Tensor | None], *static: object
) -> Tensor:
    """``fn(*args, *static)``; on CUDA replayed from a graph once its signature repeats.

    ``args`` are the tensors the loop reads (``None`` allowed; the first must be a tensor),
    ``static`` the plain values it depends on (part of the signature).
    """
    global _failed
    if _eager_only(args):
        return fn(*args, *static)
    key = (fn, static, tuple(None if a is None else (a.shape, a.dtype, a.device) for a in args))
    with _lock:
        graph = _graphs.get(key)
        if graph is not None:
            _graphs.move_to_end(key)
            return graph(args)
        out = fn(*args, *static)
        if key not in _seen:  # first sighting: capture only signatures that come back
            _seen[key] = None
            while len(_seen) > _SEEN_MAX:
                _seen.popitem(last=False)
            return out
        del _seen[key]
        budget = _budget()
        if sum(a.nbytes for a in args if a is not None) >= budget:
            return out
        try:
            graph = _Graph(fn, args, static)
        except Exception as e:  # a capture that fails must never fail the request
            _failed = True
            logger.warning("greedy scorers: CUDA graph capture failed (%s: %s); running them "
                           "eagerly from now on", type(e).__name__, e)
            return out
        if graph.nbytes <= budget:
            _graphs[key] = graph
            total = sum(g.nbytes for g in _graphs.values())
            while total > budget:
                total -= _graphs.popitem(last=False)[1].nbytes
        return out


def graph_count() -> int:
    """Number of cached graphs (for tests and diagnostics)."""
    return len(_graphs)


def clear_graphs() -> None:
    """Drop every cached graph and sighting (their memory returns to torch's allocator)."""
    global _failed
    with _lock:
        _graphs.clear()
        _seen.clear()
        _failed = False
