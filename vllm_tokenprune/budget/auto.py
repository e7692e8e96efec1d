"""``prune_ratio: "auto"``: each item's kept-token count, chosen from its pixels.

Runs in the API server process, in the multimodal processor, after the HF image processor and
before the vision encoder: the prompt's placeholder count is fixed when the request is processed
(``shared/notes/methods.md``, "Keep-count rule"), so the count can depend on the pixels, never on
the encoder's features. Torch and numpy; no vLLM import.

The rule (``docs/budgets.md`` has the reasons, the defaults and the measurements):

1. One descriptor row per language-model token (:mod:`.grids`): a fixed point sample of the
   pixels the token covers, in pixel units (``D`` values).
2. The token grid is cut into windows of at most ``window x window`` tokens (videos: over at
   most ``window_frames`` consecutive token steps; LLaVA-NeXT tiles: each tile alone), as even
   as they can be (21 tokens: three windows of 7), the last on an axis ending at the edge (22
   tokens: three of 8, overlapping by 2): every window holds the same ``n`` tokens. Each
   window's rows are centred on the window's mean row; ``G`` is their Gram matrix, whose
   eigenvalues ``l_i`` are the window's spectral energy.
3. The window's rank (rule ``participation``, the default) is the number of equally strong
   components its energy is spread over: ``(sum l)^2 / sum l^2 = trace(G)^2 / ||G||_F^2`` (the
   inverse Simpson index of the energy shares; no eigendecomposition), with the expected
   contribution of i.i.d. pixel noise of std ``noise_floor`` removed from both moments (0 when
   no energy is left above it), at most ``min(n - 1, D)``. Rule ``energy``: the smallest ``r``
   whose ``r`` largest eigenvalues hold ``energy`` of the energy above the noise edge
   (Marchenko-Pastur: ``noise_floor^2 (sqrt(n - 1) + sqrt(D))^2``), E-AdaPrune's rule per window.
4. The item keeps ``scale`` x the sum of its windows' ranks, scaled to the grid's tokens (by
   tokens / rows read: overlapping windows and the lattice below; and by ``num_tokens / rows``
   where the model's token count differs from the grid, as LLaVA-NeXT's unpadded tiles),
   clamped to ``[ceil(min_fraction * N), floor(max_fraction * N)]`` and to ``[min_keep, N]``.
   Above ``max_windows`` windows, a fixed lattice of them estimates the sum.

In the API server (:class:`~vllm_tokenprune.budget.hf.AutoCounter`) a :class:`Reader` is kept
per processor-output layout. Where numba is installed the count is one compiled pass over the
pixels (:mod:`.kernel`): a reader holds the layout's integers (:func:`pass_reader`), and a
Qwen-VL item needs none (:func:`count_pass`). Otherwise (and
for rule ``energy``) an image of a size seen before costs one gather from the pixels and a few
matrix products, and a Qwen-VL image of a new size makes its gather offsets from an index of
every token's values kept for all sizes
(:meth:`~vllm_tokenprune.budget.windows.Plan.packed_offsets`). The two agree to float
rounding.

Deterministic: no randomness; the same pixels give the same count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from vllm_tokenprune.budget import kernel
from vllm_tokenprune.budget.grids import MOSAIC, TokenGrid, dense_grid, packed_index
from vllm_tokenprune.budget.windows import Plan, _axis, plan_windows
from vllm_tokenprune.scoring._registry import _check_bounds, _coerce, option

__all__ = ["AutoEstimate", "AutoOptions", "Reader", "auto_options", "estimate_keep", "reader",
           "window_ranks"]

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
        8, "most LM tokens on a window's side, the windows as even as they can be (0: the "
        "whole item is one window)", ge=0, le=1024)
    window_frames: int = option(
        2, "video: most consecutive token steps (frames) per window", ge=1, le=64)
    samples: int = option(4, "pixel columns sampled per sample row, within one patch (Qwen-VL: "
                          "the merge block's diagonal patch the row crosses; at most patch / 2)",
                          ge=1, le=32)
    sample_rows: int = option(
        4, "pixel rows sampled per token (Qwen-VL: sample_rows / merge in each diagonal patch; "
        "at most patch / 2 per patch)", ge=1, le=32)
    channel: int = option(
        MOSAIC, "colour channels sampled: -2 a mosaic (one channel per sample row: green, red, "
        "green, blue; a third of the reads); -1 all three; 0, 1, 2: R, G or B alone",
        ge=-2, le=2)
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
        # hashed once: the options are part of every image's reader key (budget/hf.py)
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        # the hash of a str field differs between processes: hashed again when unpickled
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))


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


class AutoEstimate(typing.NamedTuple):
    """What ``auto`` chose for one item (a named tuple: made on every request, cheaply).

    ``num_keep``: the count to keep; ``rank``: the summed window ranks before ``scale`` and the
    bounds (estimated from a lattice of windows above ``max_windows``);
    ``rows``: the grid's descriptor rows; ``num_tokens``: the item's N; ``bound``: ``"min"``,
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


_FLOAT32 = np.dtype(np.float32)

#: The most tokens a window is centred by an ``n x n`` matrix product (64 KiB at most); larger
#: windows (``window: 0``, long video windows) by subtracting their mean.
CENTRING_MATRIX_MAX = 128


@functools.lru_cache(maxsize=16)
def _centring(n: int) -> np.ndarray:
    """``I - 1 1^T / n`` (float32, ``n x n``): a window's ``D x n`` matrix times it is centred
    (and, symmetric and idempotent, ``X C X^T`` is the centred Gram)."""
    c = np.eye(n, dtype=np.float32) - np.float32(1.0 / n)
    c.setflags(write=False)
    return c


@functools.lru_cache(maxsize=16)
def _diagonal(d: int) -> np.ndarray:
    """``(d * d, 1)``: a flattened ``d x d`` matrix's trace as a product."""
    return np.eye(d, dtype=np.float32).reshape(-1, 1)


@functools.lru_cache(maxsize=64)
def _scaling(factor: bytes) -> np.ndarray:
    """The per-value factors to pixel units (float32 bytes) as a ``D x D`` diagonal matrix."""
    return np.diag(np.frombuffer(factor, dtype=np.float32))


@functools.lru_cache(maxsize=64)
def _consts(k: int, d: int, var: float) -> tuple[float, ...]:
    """For a window of ``k`` tokens and ``D = d`` values, noise of variance ``var``: the noise's
    expected energy ``(k - 1) d var``, its Frobenius terms ``2 (d + k) var`` and
    ``((k - 1) d^2 + (k - 1)^2 d) var^2``, the rounding floor ``1e-10 k d``, the largest rank
    ``max(1, min(k - 1, d))`` and the Marchenko-Pastur edge of rule ``energy``."""
    return ((k - 1) * d * var, 2 * (d + k) * var,
            ((k - 1) * d * d + (k - 1) ** 2 * d) * var**2, 1e-10 * k * d,
            float(max(1, min(k - 1, d))),
            max(var * (math.sqrt(max(k - 1, 1)) + math.sqrt(d)) ** 2, 1e-10 * k * d))


def _energy_rank(gram: np.ndarray, r: Reader) -> float:
    """Rule ``energy``: per window, the smallest rank whose eigenvalues hold ``energy`` of the
    energy above the Marchenko-Pastur edge (an eigendecomposition per window, float64)."""
    lam = np.linalg.eigvalsh(gram.astype(np.float64))[:, ::-1] * r.unit  # descending
    sig = np.where(lam > r.consts[5], lam, 0.0)
    energy = sig.sum(axis=-1)
    k = (np.cumsum(sig, axis=-1) < r.opts.energy * energy[:, None]).sum(axis=-1) + 1
    return float(np.where(energy > 0, k, 0).sum())


class Reader(typing.NamedTuple):
    """``auto`` compiled for one token-grid layout and options: the gather offsets of the
    windows (``index``, ``B x D x n``), the factor to pixel units (``scaling``, a ``D x D``
    diagonal, or None and ``unit``, one factor squared), the centring matrix, the rule's
    constants, ready to read pixels of that layout (:meth:`estimate`). :func:`reader` makes
    them (a named tuple, cheap to make); :class:`~vllm_tokenprune.budget.hf.AutoCounter` keeps
    one per processor output layout, so that a request's image costs a look-up, one gather and
    a few matrix products."""

    plan: Plan
    index: np.ndarray | None  # None: read by the compiled pass (``compiled``)
    opts: AutoOptions
    tokens: int  # the grid's F * H * W
    scaling: np.ndarray | None
    unit: float
    centring: np.ndarray | None  # None: windows above CENTRING_MATRIX_MAX tokens
    diagonal: np.ndarray | None
    consts: tuple[float, ...]
    values: int  # D
    by_values: bool  # the Gram is D x D (else n x n)
    #: the elements the source must hold and the compiled pass's arguments after the pixels
    #: (:mod:`.kernel`: value offsets, floats, windows read, the layout's integers); None:
    #: numpy reads (``index``)
    compiled: tuple[Any, ...] | None = None

    def rank(self, source: np.ndarray) -> float:
        """The item's summed window rank, scaled to the whole grid (tokens / rows read), from
        its pixels (the flat array the offsets index)."""
        return self.estimate(source).rank

    def estimate(self, source: np.ndarray, num_tokens: int | None = None,
                 min_keep: int = 1) -> AutoEstimate:
        """:func:`estimate_keep` of these pixels (``source``: the flat array the offsets index;
        an array of any shape is read flat): ``scale`` x the summed rank, scaled by
        ``num_tokens / tokens``, within the bounds.

        The windows' ``(B, D, n)`` values in one gather, then matrix products only (one kind of
        numpy call: after the processor each new kind of call runs cold, tens of microseconds,
        and so does each Python call: this is one, ``docs/budgets.md``, "Cost"): to pixel units
        (``scaling``, or ``unit`` on the moments), centred by the ``n x n`` centring matrix (by
        the mean above ``CENTRING_MATRIX_MAX`` tokens), one batched Gram (``D x D`` or
        ``n x n``, whichever is smaller), its trace and squared Frobenius norm; the per-window
        rule on Python floats."""
        rows = self.tokens
        n = rows if num_tokens is None else int(num_tokens)
        if n < 1:
            raise ValueError(f"num_tokens must be >= 1, got {n}")
        opts = self.opts
        if self.compiled is not None:
            return _bounded(_run_pass(source, *self.compiled), self, n, min_keep)
        x = source.take(self.index, mode="clip")
        if x.dtype != _FLOAT32:
            x = x.astype(_FLOAT32)
        if self.scaling is not None:
            x = np.matmul(self.scaling, x)
        if self.centring is not None:
            y = np.matmul(x, self.centring)  # centred
        else:  # a large window: the n x n matrix would cost n^2 memory and D n^2 products
            y = x - x.mean(axis=2, keepdims=True)
        gram = (np.matmul(y, x.transpose(0, 2, 1)) if self.by_values
                else np.matmul(y.transpose(0, 2, 1), y))
        if opts.rule == "participation":
            # (sum l)^2 / sum l^2 = trace(G)^2 / ||G||_F^2: no eigendecomposition. The floor's
            # noise (std noise_floor in every entry) is removed from both moments in
            # expectation, cross terms with the signal included; a centred window's rank is at
            # most n - 1.
            flat = gram.reshape(len(gram), 1, -1)
            traces = np.matmul(flat, self.diagonal).reshape(-1).tolist()  # type: ignore[arg-type]
            squares = np.matmul(flat, flat.transpose(0, 2, 1)).reshape(-1).tolist()
            noise, cross, square, floor, top, _ = self.consts
            unit, d = self.unit, self.values
            total = 0.0
            for tr, sq in zip(traces, squares, strict=True):
                signal = tr * unit - noise
                if signal > floor:
                    fro = sq * unit * unit - cross * signal - square
                    total += min(signal * signal / fro if fro > 0 else d, top)
        else:
            total = _energy_rank(gram, self)
        return _bounded(total, self, n, min_keep)


def _bounded(total: float, r: Reader, n: int, min_keep: int) -> AutoEstimate:
    return keep_of(total, r.tokens, r.plan.rows, r.opts, n, min_keep)


def keep_of(total: float, rows: int, read: int, opts: AutoOptions, n: int,
            min_keep: int) -> AutoEstimate:
    """Rule step 4: ``scale`` x the windows' summed rank ``total`` (over ``read`` token rows),
    scaled to the grid's ``rows`` tokens and to ``n``, within the bounds."""
    total = total * rows / read
    want = round(opts.scale * total * n / rows)
    lo = min(n, max(min_keep, math.ceil(opts.min_fraction * n - 1e-9)))
    hi = max(lo, min(n, math.floor(opts.max_fraction * n + 1e-9)))
    keep = min(max(want, lo), hi)
    bound = "min" if want < lo else "max" if want > hi else None
    return AutoEstimate(num_keep=keep, rank=total, rows=rows, num_tokens=n, bound=bound)


def reader(grid: TokenGrid, opts: AutoOptions, video: bool = False) -> Reader:
    """The :class:`Reader` of ``grid``'s layout: its window plan (kept per grid shape) and its
    gather offsets (a packed grid's, all windows computed, reordered from its kept token index;
    any other's made from the strides): :mod:`.hf` keeps the readers."""
    f, h, w, d = grid.shape
    if f * h * w * d == 0:
        raise ValueError(f"grid must be non-empty, got {(f, h, w, d)}")
    plan = plan_windows((f, h, w), opts.window, opts.window_frames if video else 1,
                        opts.max_windows)
    if uses_kernel(opts) and min(grid.strides) >= 0 and grid.offsets.min() >= 0:
        return compiled_reader(plan, grid, opts)
    if grid.packed and plan.chosen is None:
        rows = packed_index(grid.strides[2], grid.offsets.tobytes()).rows(f * h * w)
        index = plan.packed_offsets(rows, grid.base)
    else:
        index = plan.offsets(grid)
    return layout_reader(plan, index, opts, d, grid.factor, grid.uniform)


def uses_kernel(opts: AutoOptions) -> bool:
    """Whether readers of ``opts`` count with the compiled pass (:mod:`.kernel`: rule
    ``participation``, numba installed and not turned off)."""
    return opts.rule == "participation" and kernel.compiled() is not None


def compiled_reader(plan: Plan, grid: TokenGrid, opts: AutoOptions) -> Reader:
    """A :class:`Reader` of ``grid``'s layout for the compiled pass: its strides, the plan's
    window starts and the value offsets (no gather offsets are made)."""
    return pass_reader(plan, grid.strides, grid.base,
                       *pass_values(grid.offsets, grid.factor, grid.uniform), opts)


def pass_values(offsets: np.ndarray, factor: np.ndarray, uniform: float | None
                ) -> tuple[tuple[np.ndarray, int], tuple[float, ...]]:
    """What the compiled pass reads of every token, from a grid's value ``offsets`` and
    factors to pixel units (:class:`~vllm_tokenprune.budget.grids.TokenGrid`'s ``factor`` and
    ``uniform``): the offsets as int64 and the largest, and one factor per value."""
    d = len(offsets)
    return (_pass_offsets(np.asarray(offsets, np.int64).tobytes()),
            tuple(factor.tolist()) if uniform is None else (uniform,) * d)


@functools.lru_cache(maxsize=16)
def _pass_offsets(offsets: bytes) -> tuple[np.ndarray, int]:
    off = np.frombuffer(offsets, dtype=np.int64)
    return off, int(off.max())


@functools.lru_cache(maxsize=64)
def _pass_floats(n: int, var: float, factors: tuple[float, ...]) -> np.ndarray:
    consts = _consts(n, len(factors), var)
    out = np.array([*consts[:5], *factors], dtype=np.float64)
    out.setflags(write=False)
    return out


def count_pass(source: np.ndarray, shape: tuple[int, int, int], strides: tuple[int, int, int],
               base: int, values: tuple[np.ndarray, int], factors: tuple[float, ...],
               opts: AutoOptions, frames: int, num_tokens: int | None = None,
               min_keep: int = 1) -> AutoEstimate | None:
    """The count of an ``(F, H, W)`` grid of a separable layout (as :func:`pass_reader`'s)
    through the compiled pass, with nothing made or kept per layout: the windows' sides come
    from the per-axis pieces kept for every length, the starts are computed in the pass. None
    where the grid has more than ``max_windows`` windows (a lattice: a kept :class:`Reader`
    reads it). ``frames``: the frames a window spans (videos: ``window_frames``, else 1)."""
    f, h, w = shape
    # plan_windows' first steps, inline: this runs per count, cold after the processor
    (fw, fs, _), (wh, ys, _), (ww, xs, _) = (_axis(f, frames), _axis(h, opts.window),
                                             _axis(w, opts.window))
    windows = len(fs) * len(ys) * len(xs)
    if 0 < opts.max_windows < windows:  # plan_windows would choose a lattice
        return None
    rows = f * h * w
    n = rows if num_tokens is None else int(num_tokens)
    if n < 1:
        raise ValueError(f"num_tokens must be >= 1, got {n}")
    (sf, sy, sx), (off, top) = strides, values
    extent = base + (f - 1) * sf + (h - 1) * sy + (w - 1) * sx + top + 1  # as pass_reader's
    side = fw * wh * ww
    total = _run_pass(source, extent, off, _pass_floats(side, opts.noise_floor**2, factors),
                      kernel.NO_WINDOWS, base, sf, sy, sx, f, h, w, fw, wh, ww)
    return keep_of(total, rows, windows * side, opts, n, min_keep)


def _run_pass(source: np.ndarray, extent: int, *args: Any) -> float:
    """The compiled pass on ``source`` read flat (``args``: the pass's after the pixels),
    once the pixels are known to hold the ``extent`` values the layout reads."""
    flat = source.reshape(-1)
    if flat.dtype not in kernel.DTYPES:  # compiled for the processors' outputs only
        flat = flat.astype(_FLOAT32)
    if flat.size < extent:  # the pass reads unchecked: never past the pixels
        raise ValueError(f"pixels hold {flat.size} values, the layout reads {extent}")
    return kernel.compiled()(flat, *args)  # type: ignore[misc]


def pass_reader(plan: Plan, strides: tuple[int, int, int], base: int,
                values: tuple[np.ndarray, int], factors: tuple[float, ...],
                opts: AutoOptions) -> Reader:
    """A :class:`Reader` for the compiled pass (:mod:`.kernel`) of a separable layout: token
    ``(f, y, x)``'s value ``d`` at ``base + f sf + y sy + x sx + offsets[d]`` (``values`` and
    ``factors``: :func:`pass_values`)."""
    (f, h, w), (sf, sy, sx) = plan.shape, strides
    off, top = values
    n, d = plan.n, len(factors)
    extent = base + (f - 1) * sf + (h - 1) * sy + (w - 1) * sx + top + 1
    chosen = (kernel.NO_WINDOWS if plan.chosen is None
              else np.array(plan.chosen, dtype=np.int64))
    return Reader(plan=plan, index=None, opts=opts, tokens=f * h * w, scaling=None, unit=1.0,
                  centring=None, diagonal=None, consts=_consts(n, d, opts.noise_floor**2),
                  values=d, by_values=True,
                  compiled=(extent, off, _pass_floats(n, opts.noise_floor**2, factors), chosen,
                            base, sf, sy, sx, f, h, w, *plan.tail))


def layout_reader(plan: Plan, index: np.ndarray, opts: AutoOptions, d: int,
                  factor: np.ndarray, uniform: float | None) -> Reader:
    """A :class:`Reader` of a plan and its gather offsets; ``factor`` / ``uniform``: the
    values' factors to pixel units (as :class:`~vllm_tokenprune.budget.grids.TokenGrid`'s)."""
    n = plan.n
    return Reader(
        plan=plan, index=index, opts=opts, tokens=math.prod(plan.shape),
        scaling=None if uniform is not None else _scaling(factor.tobytes()),
        unit=1.0 if uniform is None else uniform * uniform,
        centring=_centring(n) if n <= CENTRING_MATRIX_MAX else None,
        diagonal=_diagonal(min(d, n)), consts=_consts(n, d, opts.noise_floor**2), values=d,
        by_values=d <= n)


def _as_view(grid: Tensor | TokenGrid) -> TokenGrid:
    if isinstance(grid, TokenGrid):
        return grid
    if grid.dim() != 4 or grid.numel() == 0:
        raise ValueError(f"grid must be a non-empty (F, H, W, D) tensor, got {tuple(grid.shape)}")
    return dense_grid(grid)


def window_ranks(grid: Tensor | TokenGrid, opts: AutoOptions, *,
                 video: bool = False) -> tuple[float, int, int]:
    """``(rank, windows, computed)`` for a ``(F, H, W, D)`` token grid (or a
    :class:`~vllm_tokenprune.budget.grids.TokenGrid` not yet read): the sum of its windows'
    ranks, the number of windows, and how many were computed. The sum is scaled by rows (the
    grid's tokens / the rows of the windows computed): where the last window on an axis
    overlaps its neighbour, and above ``max_windows`` windows, where a fixed lattice of them is
    computed (and only their tokens are read). ``video``: the frames are consecutive in time,
    ``window_frames`` of them share a window (otherwise, as LLaVA-NeXT's tiles, every frame is
    windowed alone)."""
    view = _as_view(grid)
    r = reader(view, opts, video)
    return r.rank(view.source), r.plan.windows, r.plan.computed


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
    view = _as_view(grid)
    return reader(view, auto_options(options), video).estimate(view.source, num_tokens, min_keep)
