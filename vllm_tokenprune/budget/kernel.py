"""``auto``'s window ranks in one compiled pass over the pixels (rule ``participation``): the
gather, centring, Gram moments and per-window rule of :meth:`.auto.Reader.estimate` in a single
call, with no gather offsets, temporaries or BLAS calls. Cold after the HF image processor,
numpy calls, BLAS calls and offset arrays cost more than the arithmetic (``docs/budgets.md``,
"Cost").

Compiled with numba where it is installed (vLLM's CPU wheel requires it; vLLM's own fused Kimi
image processor uses it the same way, as an optional import), on first use, and kept in numba's
on-disk cache. Without numba, or with ``VLLM_TOKENPRUNE_AUTO_JIT=0``, :mod:`.auto` reads with
numpy: the same rule, the ranks equal to float rounding (``tests/test_budget_kernel.py``).

Runs in the API server process (the multimodal processor), with :mod:`.auto`. No vLLM import;
numba is imported on first use, not with this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vllm_tokenprune.log import logger_name

__all__ = ["DTYPES", "JIT_ENV", "NO_WINDOWS", "compiled", "warm"]

# Under vLLM's logger namespace, so the server log shows these lines (vllm_tokenprune.log).
logger = logging.getLogger(logger_name(__name__))

#: ``0`` turns the compiled pass off (numpy reads instead).
JIT_ENV = "VLLM_TOKENPRUNE_AUTO_JIT"

#: The pixel dtypes the pass is compiled for (one compilation each): the HF processors' outputs,
#: normalized (float32) or raw (uint8, vLLM's Qwen-VL call). Others are read as float32.
DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))

def _rank_sum(src: Any, off: Any, floats: Any, chosen: Any, base: int, sf: int, sy: int,
              sx: int, f: int, h: int, w: int, fw: int, wh: int,
              ww: int) -> float:  # pragma: no cover - compiled
    """The summed participation ratio of the windows read (each at most ``top``), the pixels'
    noise removed as in :meth:`.auto.Reader.estimate`. Token ``(i, y, x)`` of the ``f x h x w``
    grid has value ``d`` at ``base + i sf + y sy + x sx + off[d]``; windows of ``fw x wh x ww``
    tokens start every side on each axis, the last at the edge (:func:`.windows._starts`);
    ``chosen``: the windows read, by raster index (empty: all); ``floats``: noise, cross,
    square, floor, top, then the D factors to pixel units. The values are centred and their
    Gram's moments summed in float64 (the numpy path: float32 matrix products). Compiled
    (:func:`compiled`); the layout is plain integers, so a new image size makes no array."""
    nf = -(-f // fw)
    ny = -(-h // wh)
    nx = -(-w // ww)
    nb = chosen.shape[0] if chosen.shape[0] > 0 else nf * ny * nx
    d = off.shape[0]
    noise, cross, square, floor, top = floats[0], floats[1], floats[2], floats[3], floats[4]
    n = fw * wh * ww
    buf = np.empty((d, n), np.float64)
    total = 0.0
    for c in range(nb):
        r = chosen[c] if chosen.shape[0] > 0 else c
        start = (base + min((r // (ny * nx)) * fw, f - fw) * sf
                 + min(((r // nx) % ny) * wh, h - wh) * sy + min((r % nx) * ww, w - ww) * sx)
        k = 0
        for a in range(fw):
            for b in range(wh):
                row = start + a * sf + b * sy
                for e in range(ww):
                    t = row + e * sx
                    for v in range(d):
                        buf[v, k] = src[t + off[v]]
                    k += 1
        for v in range(d):
            s = 0.0
            for k in range(n):
                s += buf[v, k]
            mean = s / n
            factor = floats[5 + v]
            for k in range(n):
                buf[v, k] = (buf[v, k] - mean) * factor
        trace = 0.0
        sq = 0.0
        for i in range(d):
            for j in range(i, d):
                g = 0.0
                for k in range(n):
                    g += buf[i, k] * buf[j, k]
                if i == j:
                    trace += g
                    sq += g * g
                else:
                    sq += 2.0 * g * g
        signal = trace - noise
        if signal > floor:
            fro = sq - cross * signal - square
            rank = signal * signal / fro if fro > 0 else float(d)
            total += min(rank, top)
    return total


_LOCK = threading.Lock()

#: ``chosen`` when every window is read.
NO_WINDOWS = np.zeros(0, np.int64)
NO_WINDOWS.setflags(write=False)


#: the pass once built (its one element: the function, or None), behind ``_LOCK``
_BUILT: list[Callable[..., float] | None] = []

# reassoc: the dot products' sums may be reordered, so they vectorize (no fast NaN/inf)
_FLAGS: dict[str, Any] = {"nogil": True, "fastmath": {"reassoc", "contract"}}


def compiled() -> Callable[..., float] | None:
    """The compiled pass, or None (no numba, :data:`JIT_ENV` is ``0``, or numba failed to
    build it: numpy counts instead, with a warning in the log). Built on the first call, for
    every dtype of :data:`DTYPES` (a request's count never compiles): about 1.4 s the first
    time on a machine, 0.3-0.5 s from numba's on-disk cache (``docs/budgets.md``, "Cost")."""
    if _BUILT:
        return _BUILT[0]
    with _LOCK:
        if not _BUILT:
            _BUILT.append(_build())
    return _BUILT[0]


def warm() -> None:
    """Build the pass now (:func:`compiled`), not in a request: the processor calls it at
    start-up where the server's default is ``auto``."""
    compiled()


def _build() -> Callable[..., float] | None:
    if os.environ.get(JIT_ENV, "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        logger.info("prune_ratio auto: numba is not installed, counting with numpy")
        return None
    t0 = time.perf_counter()
    try:
        try:
            fn = numba.njit(cache=True, **_FLAGS)(_rank_sum)
        except RuntimeError as e:  # no writable cache directory: compiled in every process
            logger.info("prune_ratio auto: numba cannot cache the pass here (%s)", e)
            fn = numba.njit(cache=False, **_FLAGS)(_rank_sum)
        for dtype in DTYPES:
            fn(np.zeros(4, dtype), np.zeros(1, np.int64),
               np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), NO_WINDOWS, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    except Exception as e:  # a numba or LLVM failure must not fail requests: numpy counts
        logger.warning("prune_ratio auto: the compiled pass could not be built, counting with "
                       "numpy: %s: %s", type(e).__name__, e)
        return None
    logger.info("prune_ratio auto: compiled pass ready in %.2f s", time.perf_counter() - t0)
    return fn
