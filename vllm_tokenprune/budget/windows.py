"""``auto``'s windows: how an item's token grid is cut into windows whose ranks are summed
(:mod:`.auto`, rule step 2), and where their values lie in the processor's pixels.

Runs in the API server process (the multimodal processor), with :mod:`.auto`. Numpy; no vLLM
import. Plans are kept per grid shape and their pieces per axis length: a new image size is
mostly made of lengths met before, and a few list steps cost less than numpy calls made cold
after the processor (``docs/budgets.md``, "Cost").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vllm_tokenprune.budget.grids import TokenGrid

__all__ = ["Plan", "plan_windows"]


def _lattice(num: int, cap: int, cols: int) -> list[int]:
    """Indices of about ``cap`` of ``num`` windows in raster order: every ``s``-th, ``s`` the
    smallest stride >= ``num / cap`` coprime with the raster width (a diagonal lattice, no
    stripes); all of them when ``num <= cap`` or ``cap == 0``."""
    if cap <= 0 or num <= cap:
        return list(range(num))
    s = -(-num // cap)
    while math.gcd(s, cols) != 1:
        s += 1
    return list(range(s // 2, num, s))


@dataclass(frozen=True, eq=False)
class Plan:
    """The windows of an ``(F, H, W)`` token grid (``shape``): each holds ``tail = (fw, wh, ww)``
    tokens (the last window on an axis ends at the edge, overlapping its neighbour, so no window
    is padded and one ``n x n`` centring matrix serves them all); ``axes``: the windows' first
    token on each axis (frame, row, column), every window being one of each in raster order;
    ``takes``: per axis, the tokens its windows hold in order (None where they tile the axis
    exactly; kept per axis length, :func:`_axis`); ``chosen``: the windows read, by raster
    index (None: all); ``windows``: all the grid's windows, ``computed``: the windows read,
    ``rows``: the token rows they hold (overlaps counted twice). Python tuples: a new image size
    makes a plan, and a few list steps cost less than numpy calls made cold."""

    shape: tuple[int, int, int]
    tail: tuple[int, int, int]
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    takes: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]
    chosen: tuple[int, ...] | None
    windows: int

    @property
    def computed(self) -> int:
        return self.windows if self.chosen is None else len(self.chosen)

    @property
    def n(self) -> int:
        return math.prod(self.tail)

    @property
    def rows(self) -> int:
        return self.computed * self.n

    def offsets(self, grid: TokenGrid) -> np.ndarray:
        """The gather offsets of ``grid``'s windows, ``(B, D, n)``: window start + value +
        token in the window, through the grid's strides (one array of the starts and the
        in-window steps, two outer sums). A packed grid's, all windows computed, are made
        from its kept token index instead (:meth:`packed_offsets`)."""
        sf, sy, sx = grid.strides
        fs, ys, xs = self.axes
        first = [grid.base + f * sf + y * sy + x * sx for f in fs for y in ys for x in xs]
        if self.chosen is not None:
            first = [first[i] for i in self.chosen]
        fw, wh, ww = self.tail
        steps = np.array(first + [f * sf + y * sy + x * sx for f in range(fw)
                                  for y in range(wh) for x in range(ww)], dtype=np.intp)
        b = len(first)
        index = np.add.outer(np.add.outer(steps[:b], grid.offsets), steps[b:])
        index.setflags(write=False)
        return index

    def packed_offsets(self, rows: np.ndarray, base: int) -> np.ndarray:
        """The gather offsets, ``(B, D, n)``, of a packed grid's windows (all computed), from
        its tokens' rows of the kept packed index (``(F * H * W, D)``, raster order:
        :class:`~vllm_tokenprune.budget.grids.PackedIndex`) and the item's first pixel: a take
        on each axis whose windows overlap and one copy into window order. Nothing made per
        image size but this (``docs/budgets.md``, "Cost")."""
        x = rows.reshape(*self.shape, rows.shape[-1])
        for axis, take in enumerate(self.takes):
            if take is not None:
                x = x.take(take, axis=axis)
        (bf, by, bx), (fw, wh, ww) = map(len, self.axes), self.tail
        x = x.reshape(bf, fw, by, wh, bx, ww, -1).transpose(0, 2, 4, 6, 1, 3, 5)
        index = np.ascontiguousarray(x).reshape(self.windows, -1, fw * wh * ww)
        if base:  # a new array: with one window per axis the copy above may be the rows
            index = index + base
        index.setflags(write=False)
        return index


def _side(size: int, most: int) -> int:
    """A window's side on an axis of ``size`` tokens: at most ``most``, the windows as even as
    they can be (``ceil(size / ceil(size / most))``: 21 tokens in windows of 8 -> three of 7),
    so that the last one overlaps its neighbour by fewer tokens than there are windows."""
    return -(-size // -(-size // most))


def _starts(size: int, side: int) -> list[int]:
    """The windows' first tokens on one axis: every ``side``, the last ending at the edge."""
    return [min(i * side, size - side) for i in range(-(-size // side))]


@functools.lru_cache(maxsize=1024)
def _axis(size: int, most: int) -> tuple[int, tuple[int, ...], np.ndarray | None]:
    """An axis of ``size`` tokens in windows of at most ``most`` (0: one window): the side, the
    windows' first tokens, and the tokens they hold in order where they overlap (None where
    they tile the axis). Kept per length: a new image size is mostly made of lengths met
    before."""
    side = size if most == 0 else _side(size, most)
    starts = tuple(_starts(size, side))
    take = None
    if len(starts) * side != size:
        take = np.array([s + i for s in starts for i in range(side)], dtype=np.intp)
        take.setflags(write=False)
    return side, starts, take


@functools.lru_cache(maxsize=256)
def plan_windows(shape: tuple[int, int, int], window: int, frames: int, cap: int) -> Plan:
    """The windows of an ``(F, H, W)`` token grid: at most ``window x window`` tokens (``0``:
    the whole grid) over at most ``frames`` consecutive frames, as even as they can be
    (:func:`_side`), in raster order (frame group, row, column); above ``cap`` windows, a
    lattice of them (:func:`_lattice`). The 256 latest plans are kept (a few hundred bytes
    each)."""
    f, h, w = shape
    (fw, fs, ft), (wh, ys, yt), (ww, xs, xt) = _axis(f, frames), _axis(h, window), _axis(w, window)
    windows = len(fs) * len(ys) * len(xs)
    chosen = _lattice(windows, cap, len(xs))
    return Plan(shape, (fw, wh, ww), (fs, ys, xs), (ft, yt, xt),
                 None if len(chosen) == windows else tuple(chosen), windows)
