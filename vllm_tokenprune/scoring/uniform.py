"""uniform baseline: an even spatial/temporal stride over the token grid (pure torch, no vLLM).

With ``grid = (t, h, w)`` (``t*h*w == N``, frames first, row-major):

1. Frame budgets: ``k_f = floor((f+1) k / t) - floor(f k / t)`` (sums to k, differ by at most
   one, and when ``k < t`` the frames that get a token are spread evenly in time).
2. In a frame with budget ``c``: a ``rows x cols`` lattice with ``rows/cols ~ h/w`` and
   ``rows*cols >= c`` (``rows ~ sqrt(c h / w)``, ``cols = ceil(c / rows)``), at cell centres
   ``floor((i + 1/2) h / rows)``, ``floor((j + 1/2) w / cols)``.
3. If the lattice has more than ``c`` points, ``c`` of them are taken at an even stride in
   row-major order (deterministic trim); the result is exactly k unique indices.

Without a grid the tokens are treated as a 1-D sequence: indices ``floor((i + 1/2) N / k)``.
The indices depend only on ``(grid or N, k)``: they are computed once on the host with integer
arithmetic, cached, and copied to the device; the feature values are never read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, ceil_div, isqrt_round, small_tensor
from vllm_tokenprune.scoring._registry import register_method

__all__ = ["UniformOptions", "uniform_indices"]


@dataclass(frozen=True)
class UniformOptions:
    """``uniform`` has no options (pass ``grid=(t, h, w)`` for a 2-D/3-D layout)."""


def _even(n: int, k: int) -> list[int]:
    """k distinct, evenly spread indices in range(n) (k <= n)."""
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def _frame(h: int, w: int, c: int) -> list[int]:
    if c == 0:
        return []
    rows = min(h, max(1, isqrt_round(c * h / w)))
    cols = min(w, max(1, ceil_div(c, rows)))
    if rows * cols < c:
        rows = min(h, ceil_div(c, cols))
    ys, xs = _even(h, rows), _even(w, cols)
    lattice = [y * w + x for y in ys for x in xs]
    return [lattice[i] for i in _even(len(lattice), c)]


@functools.lru_cache(maxsize=256)
def _uniform_cached(n: int, k: int, grid: tuple[int, int, int] | None) -> tuple[int, ...]:
    if grid is None:
        return tuple(_even(n, k))
    t, h, w = grid
    out: list[int] = []
    for f in range(t):
        c = ((f + 1) * k) // t - (f * k) // t
        out.extend(f * h * w + p for p in _frame(h, w, c))
    return tuple(sorted(out))


def uniform_indices(
    num_tokens: int, num_keep: int, grid: tuple[int, int, int] | None = None
) -> list[int]:
    """The uniform selection as a Python list (host only)."""
    return list(_uniform_cached(num_tokens, num_keep, grid))


@register_method(
    "uniform",
    options=UniformOptions,
    summary="even stride over the (t, h, w) token grid (1-D stride without a grid)",
    batched_kind="index-only",
    uses_grid=True,
)
def uniform(batch: Batch, opts: UniformOptions) -> list[Tensor]:
    dev = str(batch.device)
    return [
        _uniform_on_device(n, k, grid, dev).clone()
        for n, k, grid in zip(batch.sizes, batch.num_keep, batch.grids, strict=True)
    ]


@functools.lru_cache(maxsize=256)
def _uniform_on_device(n: int, k: int, grid: tuple[int, int, int] | None, device: str) -> Tensor:
    # cached per device: the host-to-device copy happens once per (shape, budget)
    return small_tensor(_uniform_cached(n, k, grid), torch.int64, torch.device(device))
