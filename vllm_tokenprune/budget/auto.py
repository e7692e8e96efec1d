"""``prune_ratio: "auto"``: each item's kept-token count, chosen from its pixels.

Runs in the API server process, in the multimodal processor, after the HF image processor and
before the vision encoder: the prompt's placeholder count is fixed when the request is processed
(``shared/notes/methods.md``, "Keep-count rule"), so the count can depend on the pixels, never on
the encoder's features. Torch and numpy; no vLLM import.

The rule (``docs/budgets.md`` has the reasons, the defaults and the measurements):

1. One descriptor row per language-model token (:mod:`.grids`): a fixed point sample of the
   pixels the token covers, in pixel units (``D`` values).
2. The token grid is cut into windows of ``window x window`` tokens (videos: over
   ``window_frames`` consecutive token steps; LLaVA-NeXT tiles: each tile alone). Each window's
   ``n`` rows are centred on the window's mean row; ``G`` is their Gram matrix, whose
   eigenvalues ``l_i`` are the window's spectral energy.
3. The window's rank (rule ``participation``, the default) is the number of equally strong
   components its energy is spread over: ``(sum l)^2 / sum l^2 = trace(G)^2 / ||G||_F^2`` (the
   inverse Simpson index of the energy shares; no eigendecomposition), with the expected
   contribution of i.i.d. pixel noise of std ``noise_floor`` removed from both moments (0 when
   no energy is left above it), at most ``min(n - 1, D)``. Rule ``energy``: the smallest ``r``
   whose ``r`` largest eigenvalues hold ``energy`` of the energy above the noise edge
   (Marchenko-Pastur: ``noise_floor^2 (sqrt(n - 1) + sqrt(D))^2``), E-AdaPrune's rule per window.
4. The item keeps ``scale`` x the sum of its windows' ranks (times ``num_tokens / rows`` where
   the model's token count differs from the rows read, as LLaVA-NeXT's unpadded grid), clamped
   to ``[ceil(min_fraction * N), floor(max_fraction * N)]`` and to ``[min_keep, N]``. Above
   ``max_windows`` windows, a fixed lattice of them estimates the sum.

Deterministic: no randomness; the same pixels give the same count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from vllm_tokenprune.budget.grids import MOSAIC, TokenGrid, dense_grid
from vllm_tokenprune.scoring._registry import _check_bounds, _coerce, option

__all__ = ["AutoEstimate", "AutoOptions", "auto_options", "estimate_keep", "window_ranks"]

#: Where the server block keeps these options (``token_prune.auto``), for messages.
PREFIX = "token_prune.auto"


@dataclass(frozen=True)
class AutoOptions:
    """Options of the ``auto`` budget (the server's ``token_prune.auto`` block)."""

    rule: Literal["participation", "energy"] = option(
        "participation", "a window's rank: 'participation' (trace(G)^2 / ||G||_F^2) or "
        "'energy' (components holding `energy` of it; an eigendecomposition per window)")
    scale: float = option(
        2.0, "tokens kept per unit of summed window rank", gt=0.0, le=64.0)
    energy: float = option(
        0.9, "rule 'energy': share of each window's spectral energy (above the noise edge) the "
        "kept rank holds", gt=0.0, lt=1.0)
    min_fraction: float = option(
        0.02, "fewest tokens an item keeps, as a fraction of its N (flat images land here)",
        ge=0.0, le=1.0)
    max_fraction: float = option(
        1.0, "most tokens an item keeps, as a fraction of its N", gt=0.0, le=1.0)
    noise_floor: float = option(
        0.02, "pixel noise standard deviation (0..1 brightness) that is not content",
        ge=0.0, lt=1.0)
    window: int = option(
        8, "window side in LM tokens (0: the whole item is one window)", ge=0, le=1024)
    window_frames: int = option(
        2, "video: consecutive token steps (frames) per window", ge=1, le=64)
    samples: int = option(4, "pixel columns sampled per token (per patch: samples / merge, "
                          "at most patch / 2)", ge=1, le=32)
    sample_rows: int = option(
        4, "pixel rows sampled per token (per patch: sample_rows / merge, at most patch / 2)",
        ge=1, le=32)
    channel: int = option(
        MOSAIC, "colour channels sampled: -2 a mosaic (one channel per sample: a third of the "
        "reads); -1 all three; 0, 1, 2: R, G or B alone", ge=-2, le=2)
    max_windows: int = option(
        64, "most windows computed; above it a fixed lattice of windows estimates the sum "
        "(0: every window)", ge=0)

    def __post_init__(self) -> None:
        if self.min_fraction > self.max_fraction:
            raise ValueError(
                f"{PREFIX}: min_fraction ({self.min_fraction}) must be <= max_fraction "
                f"({self.max_fraction})")
        if self.window == 1:
            raise ValueError(f"{PREFIX}.window must be 0 (whole item) or >= 2, got 1")


def auto_options(options: Mapping[str, Any] | AutoOptions | None = None) -> AutoOptions:
    """Validated :class:`AutoOptions` from a mapping (defaults for missing keys).

    ValueError naming the field (``token_prune.auto.<key>``) for an unknown key, a wrong type
    (ints are accepted for floats, nothing else is converted) or a value out of bounds."""
    if isinstance(options, AutoOptions):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"{PREFIX} must be a mapping of options, got {type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(AutoOptions)}
    unknown = sorted(k for k in (options or {}) if k not in fields)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} in {PREFIX}; "
                         f"valid options: {', '.join(fields)}")
    hints = typing.get_type_hints(AutoOptions)
    values = {}
    for key, value in (options or {}).items():
        where = f"{PREFIX}.{key}"
        coerced = _coerce(value, hints[key], where)
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise ValueError(f"{where} must be finite, got {value!r}")
        _check_bounds(coerced, fields[key].metadata, where)
        values[key] = coerced
    return AutoOptions(**values)


@dataclass(frozen=True)
class AutoEstimate:
    """What ``auto`` chose for one item.

    ``num_keep``: the count to keep; ``rank``: the summed window ranks before ``scale`` and the
    bounds (estimated from a lattice of windows above ``max_windows``);
    ``rows``: descriptor rows read; ``num_tokens``: the item's N; ``bound``: ``"min"``,
    ``"max"`` or ``None``: which bound (if any) decided the count."""

    num_keep: int
    rank: float
    rows: int
    num_tokens: int
    bound: str | None

    @property
    def keep_fraction(self) -> float:
        return self.num_keep / self.num_tokens

    @property
    def prune_ratio(self) -> float:
        """The equivalent ratio, ``1 - num_keep / N``."""
        return 1.0 - self.num_keep / self.num_tokens


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


def _blocks(size: int, win: int) -> list[tuple[int, int, int, int]]:
    """The windows along one axis in blocks read at once: ``(first window, windows, rows each,
    first row)``: the full windows, then the remainder."""
    full = size // win
    out = [(0, full, win, 0)] if full else []
    return out + ([(full, 1, size % win, full * win)] if size % win else [])


#: One copy of a plan: the grid's ``(F, H, W)`` slices, how the block splits into ``(windows,
#: rows)`` per axis (None: one window, no split) and where it goes in the stack.
Copy = tuple[tuple[slice, slice, slice], "tuple[int, ...] | None", tuple[Any, ...]]


@dataclass(frozen=True, eq=False)
class _Plan:
    """How the windows of an ``(F, H, W)`` token grid are read: each window's transposed
    ``n x D`` matrix, ``(B, D, n)``, gathered from the pixels in one ``numpy.take`` through
    offsets arranged once per grid layout (:meth:`offsets`). The arrangement: a zero-padded
    stack of shape ``lead + (D,) + tail`` (``tail``: a window's ``(fw, wh, ww)`` tokens,
    innermost), reshaped to ``(B, D, n)``; ``lead``: ``(nF, nH, nW)`` for every window (one copy
    per block of whole windows), ``(B,)`` for a lattice (one copy per window); ``copies``: what
    :func:`_arrange` copies. ``mask`` (``B, 1, n``; None when no window is padded) is 1 on a
    window's own tokens, ``counts`` its tokens (float32, ``B, 1, 1``); ``windows``: all the
    grid's windows, ``rows``: the rows computed; ``consts``: the rule's per-window constants by
    ``(D, noise_floor)``; ``scaled``: :func:`_scaled_mask`; ``index``: the gather offsets by grid
    key."""

    lead: tuple[int, ...]
    tail: tuple[int, int, int]
    copies: tuple[Copy, ...]
    mask: np.ndarray | None
    counts: np.ndarray
    windows: int
    rows: int
    consts: dict[tuple[int, float], tuple[np.ndarray, ...]] = dataclasses.field(
        default_factory=dict)
    scaled: dict[bytes, np.ndarray] = dataclasses.field(default_factory=dict)
    index: dict[tuple[Any, ...], np.ndarray] = dataclasses.field(default_factory=dict)
    local: threading.local = dataclasses.field(default_factory=threading.local)

    def arrange(self, grid: np.ndarray) -> np.ndarray:
        """An ``(F, H, W, D)`` array's windows as a new ``(B, D, n)`` array of its dtype, zeros
        in the padding."""
        d = grid.shape[3]
        x = np.zeros((*self.lead, d, *self.tail), dtype=grid.dtype)
        lead = len(self.lead)
        t = [lead + 1 + i for i in range(3)]
        order = ([0, t[0], 1, t[1], 2, t[2]] if lead == 3 else [0, *t]) + [lead]
        _arrange(grid, x.transpose(order), self.copies)
        return x.reshape(math.prod(self.lead), d, -1)

    def offsets(self, grid: TokenGrid) -> np.ndarray:
        """The gather offsets of ``grid``'s windows (``B, D, n``; 0 in the padding), made once
        per grid layout (``grid.key``) and kept with the plan."""
        index = self.index.get(grid.key)
        if index is None:
            if len(self.index) >= 8:
                self.index.clear()
            index = self.index[grid.key] = self.arrange(grid.index)
        return index

    def stack(self, grid: TokenGrid) -> np.ndarray:
        """``grid``'s windows, ``(B, D, n)`` float32, in this thread's buffer for the plan and
        grid layout (valid until the next call). The padding holds the value at offset 0:
        :func:`_ranks` masks it."""
        store = self.local.__dict__
        key = (grid.key, grid.source.dtype)  # the scratch buffer has the pixels' dtype
        entry = store.get(key)
        if entry is None:
            index = self.offsets(grid)
            entry = store[key] = (
                index, np.zeros(index.shape, np.float32),
                None if grid.source.dtype == np.float32
                else np.zeros(index.shape, grid.source.dtype))
        index, x, scratch = entry
        return grid.take(index, x, scratch)


def _arrange(src: np.ndarray, out: np.ndarray, copies: tuple[Copy, ...]) -> None:
    """Copy ``src`` ``(F, H, W, D)`` into ``out`` (the stack's transpose) as the plan's copies
    say: each copy one block of the grid (all the full windows of a block at once)."""
    s = src.shape[3:]
    for (fs, hs, ws), split, dst in copies:
        block = src[fs, hs, ws]
        out[dst] = block if split is None else block.reshape(split + s)


@functools.lru_cache(maxsize=16)
def _plan(shape: tuple[int, int, int], window: int, frames: int, cap: int) -> _Plan:
    """The windows of an ``(F, H, W)`` token grid: ``window x window`` tokens (``0``: the whole
    grid) over ``frames`` consecutive frames, in raster order (frame group, row, column; the
    remainder windows last on each axis); above ``cap`` windows, a lattice of them
    (:func:`_lattice`). The 16 latest plans are kept, with their buffers (a few MiB at most
    each and thread: ``max_windows`` windows of ``D x n`` values and their Grams)."""
    f, h, w = shape
    fw = min(frames, f)
    wh, ww = (h, w) if window == 0 else (min(window, h), min(window, w))
    nf, nh, nw = -(-f // fw), -(-h // wh), -(-w // ww)
    chosen = _lattice(nf * nh * nw, cap, nw)
    copies: list[Copy] = []
    if len(chosen) == nf * nh * nw:
        lead: tuple[int, ...] = (nf, nh, nw)
        for fi, fn, fs, f0 in _blocks(f, fw):
            for hi, hn, hs, h0 in _blocks(h, wh):
                for wi, wn, ws, w0 in _blocks(w, ww):
                    copies.append((
                        (slice(f0, f0 + fn * fs), slice(h0, h0 + hn * hs),
                         slice(w0, w0 + wn * ws)), (fn, fs, hn, hs, wn, ws),
                        (slice(fi, fi + fn), slice(0, fs), slice(hi, hi + hn), slice(0, hs),
                         slice(wi, wi + wn), slice(0, ws))))
    else:
        lead = (len(chosen),)
        for j, i in enumerate(chosen):
            fi, rest = divmod(i, nh * nw)
            f0, h0, w0 = fi * fw, rest // nw * wh, rest % nw * ww
            fs, hs, ws = min(fw, f - f0), min(wh, h - h0), min(ww, w - w0)
            copies.append(((slice(f0, f0 + fs), slice(h0, h0 + hs), slice(w0, w0 + ws)), None,
                           (j, slice(0, fs), slice(0, hs), slice(0, ws))))
    plan = _Plan(lead, (fw, wh, ww), tuple(copies), None, np.zeros(0), nf * nh * nw, 0)
    mask = plan.arrange(np.ones((f, h, w, 1), np.float32))
    counts = mask.sum(axis=2, keepdims=True)
    return dataclasses.replace(plan, mask=None if (mask == 1).all() else mask, counts=counts,
                               rows=int(counts.sum()))


def _consts(plan: _Plan, d: int, var: float) -> tuple[list[tuple[float, ...]], np.ndarray]:
    """Per window, as Python floats: the noise's expected energy ``(k - 1) d var``, its
    Frobenius terms ``2 (d + k) var`` and ``((k - 1) d^2 + (k - 1)^2 d) var^2``, the rounding
    floor ``1e-10 k d`` and the largest rank ``max(1, min(k - 1, d))``; and (float64, ``B``) the
    Marchenko-Pastur edge of rule ``energy``."""
    key = (d, var)
    if key not in plan.consts:
        k = plan.counts.reshape(-1).astype(np.float64)
        rows = np.stack([(k - 1) * d * var, 2 * (d + k) * var,
                         ((k - 1) * d * d + (k - 1) ** 2 * d) * var**2, 1e-10 * k * d,
                         np.clip(np.minimum(k - 1, d), 1, None)], axis=1)
        edge = np.maximum(var * (np.sqrt(np.maximum(k - 1, 1)) + math.sqrt(d)) ** 2,
                          1e-10 * k * d)
        plan.consts[key] = ([tuple(r) for r in rows.tolist()], edge)
    return plan.consts[key]


def _scaled_mask(plan: _Plan, factor: np.ndarray) -> np.ndarray:
    """``plan.mask`` times the per-value factor to pixel units (``B, D, n``; ``1, D, 1`` when no
    window is padded), cached on the plan by factor."""
    key = factor.tobytes()
    if key not in plan.scaled:
        f = factor.reshape(1, -1, 1)
        plan.scaled[key] = f if plan.mask is None else plan.mask * f
    return plan.scaled[key]


@functools.lru_cache(maxsize=8)
def _diagonal(d: int) -> np.ndarray:
    """``(d * d, 1)``: a flattened ``d x d`` matrix's trace as a product."""
    return np.eye(d, dtype=np.float32).reshape(-1, 1)


def _ranks(x: np.ndarray, plan: _Plan, opts: AutoOptions, factor: np.ndarray | float) -> float:
    """The summed effective rank of the windows of a ``(B, D, n)`` float32 stack (each window's
    transposed matrix; its padding tokens, where ``plan.mask`` is 0, are ignored), times
    ``factor`` (per value, or one for all) in pixel units. Centred in place; every window at
    once: one batched Gram (tokens x tokens or features x features, whichever is smaller),
    float32; the per-window rule in float64. Numpy, not torch, and the participation rule on
    Python floats: these few calls run cold after the processor, where each torch dispatch or
    small numpy call costs several microseconds."""
    d, n = x.shape[1], x.shape[2]
    consts, edge = _consts(plan, d, opts.noise_floor**2)
    if plan.mask is None:
        sums = x.sum(axis=2, keepdims=True)
    else:  # the padding's values left out: the sums as one product with the mask
        sums = np.matmul(x, plan.mask.transpose(0, 2, 1))
    x -= np.divide(sums, plan.counts, out=sums)  # centred
    unit = 1.0
    if isinstance(factor, float):  # one factor: applied to the moments, not the pixels
        unit = factor * factor
        if plan.mask is not None:
            x *= plan.mask  # padding to zero
    else:
        x *= _scaled_mask(plan, factor)  # padding to zero, values to pixel units
    gram = np.matmul(x, x.transpose(0, 2, 1)) if d <= n else np.matmul(x.transpose(0, 2, 1), x)
    if opts.rule == "participation":
        # (sum l)^2 / sum l^2 = trace(G)^2 / ||G||_F^2: no eigendecomposition. The floor's
        # noise (std noise_floor in every entry) is removed from both moments in expectation,
        # cross terms with the signal included; a centred window's rank is at most n - 1.
        flat = gram.reshape(len(gram), 1, -1)
        # trace(G) = sum lambda, ||G||_F^2 = sum lambda^2: products again (matmul is warm)
        traces = np.matmul(flat, _diagonal(gram.shape[1])).reshape(-1).tolist()
        squares = np.matmul(flat, flat.transpose(0, 2, 1)).reshape(-1).tolist()
        total = 0.0
        for tr, sq, (noise, cross, square, floor, top) in zip(traces, squares, consts, strict=True):
            signal = tr * unit - noise
            if signal > floor:
                fro = sq * unit * unit - cross * signal - square
                total += min(signal * signal / fro if fro > 0 else d, top)
        return total
    lam = np.linalg.eigvalsh(gram.astype(np.float64))[:, ::-1] * unit  # descending
    sig = np.where(lam > edge[:, None], lam, 0.0)
    energy = sig.sum(axis=-1)
    r = (np.cumsum(sig, axis=-1) < opts.energy * energy[:, None]).sum(axis=-1) + 1
    return float(np.where(energy > 0, r, 0).sum())


def window_ranks(grid: Tensor | TokenGrid, opts: AutoOptions, *,
                 video: bool = False) -> tuple[float, int, int]:
    """``(rank, windows, computed)`` for a ``(F, H, W, D)`` token grid (or a
    :class:`~vllm_tokenprune.budget.grids.TokenGrid` not yet read): the sum of its windows'
    ranks, the number of windows, and how many were computed. Above ``max_windows`` windows, a
    fixed lattice of them is computed (and only their tokens are read) and the sum is scaled by
    rows (all rows / rows computed). ``video``: the frames are consecutive in time,
    ``window_frames`` of them share a window (otherwise, as LLaVA-NeXT's tiles, every frame is
    windowed alone)."""
    if not isinstance(grid, TokenGrid):
        if grid.dim() != 4 or grid.numel() == 0:
            raise ValueError(
                f"grid must be a non-empty (F, H, W, D) tensor, got {tuple(grid.shape)}")
        grid = dense_grid(grid)
    f, h, w, d = grid.shape
    if f * h * w * d == 0:
        raise ValueError(f"grid must be non-empty, got {(f, h, w, d)}")
    plan = _plan((f, h, w), opts.window, opts.window_frames if video else 1, opts.max_windows)
    factor = grid.factor if grid.uniform is None else grid.uniform
    total = _ranks(plan.stack(grid), plan, opts, factor)
    return total * (f * h * w) / plan.rows, plan.windows, len(plan.counts)


def estimate_keep(grid: Tensor | TokenGrid, num_tokens: int | None = None,
                  options: Mapping[str, Any] | AutoOptions | None = None, *,
                  min_keep: int = 1, video: bool = False) -> AutoEstimate:
    """How many of an item's ``num_tokens`` visual tokens ``auto`` keeps, from its token grid
    (:func:`~vllm_tokenprune.budget.grids.qwen_token_grid` or
    :func:`~vllm_tokenprune.budget.grids.patch_token_grid`).

    ``num_tokens`` defaults to the grid's rows (Qwen-VL, LLaVA-1.5: the same count); where the
    model's N differs (LLaVA-NeXT unpads its tiles), the rank is scaled by ``N / rows``.
    ``min_keep`` is the server's floor (``token_prune.min_keep``); ``video``: the grid's frames
    are a video's token steps (windows span ``window_frames`` of them)."""
    opts = auto_options(options)
    f, h, w, _ = grid.shape
    rows = f * h * w
    n = rows if num_tokens is None else int(num_tokens)
    if n < 1:
        raise ValueError(f"num_tokens must be >= 1, got {n}")
    total, _, _ = window_ranks(grid, opts, video=video)
    want = round(opts.scale * total * n / rows)
    lo = min(n, max(min_keep, math.ceil(opts.min_fraction * n - 1e-9)))
    hi = max(lo, min(n, math.floor(opts.max_fraction * n + 1e-9)))
    keep = min(max(want, lo), hi)
    bound = "min" if want < lo else "max" if want > hi else None
    return AutoEstimate(num_keep=keep, rank=total, rows=rows, num_tokens=n, bound=bound)
