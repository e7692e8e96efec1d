"""``prune_ratio: "auto"``: each item's kept-token count, chosen from its pixels.

Runs in the API server process, in the multimodal processor, after the HF image processor and
before the vision encoder: the prompt's placeholder count is fixed when the request is processed
(``shared/notes/methods.md``, "Keep-count rule"), so the count can depend on the pixels, never on
the encoder's features. Pure torch; no vLLM import.

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
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from vllm_tokenprune.budget.grids import TokenGrid
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
    samples: int = option(8, "pixel columns sampled per token (per patch: samples / merge, "
                          "at most patch / 2)", ge=1, le=32)
    sample_rows: int = option(
        4, "pixel rows sampled per token (per patch: sample_rows / merge, at most patch / 2)",
        ge=1, le=32)
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


def _spans(size: int, win: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the windows along one axis: full windows, then the remainder."""
    spans = [(i, win) for i in range(0, size // win * win, win)]
    return spans + ([(size // win * win, size % win)] if size % win else [])


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
class _Plan:
    """Which grid rows form which window: ``index`` (``B * n_max``; padding reads row 0 and is
    zeroed by ``mask``, ``B, n_max, 1``), ``counts`` (rows per window), ``k`` (the counts as
    float64, ``B``), ``spans`` (each window's ``(f0, nf, h0, nh, w0, nw)``) and ``consts``: the
    per-window constants of the rank rule, by ``(D, noise_floor)``."""

    index: Tensor
    mask: Tensor
    counts: tuple[int, ...]
    windows: int
    k: Tensor
    spans: tuple[tuple[int, int, int, int, int, int], ...]
    consts: dict[tuple[int, float], tuple[Tensor, ...]] = dataclasses.field(
        default_factory=dict)


@functools.lru_cache(maxsize=64)
def _plan(shape: tuple[int, int, int], window: int, frames: int, cap: int) -> _Plan:
    """The windows of an ``(F, H, W)`` token grid: ``window x window`` tokens (``0``: the whole
    grid) over ``frames`` consecutive frames, in raster order (frame group, row, column); above
    ``cap`` windows, a lattice of them (:func:`_lattice`)."""
    f, h, w = shape
    wh, ww = (h, w) if window == 0 else (min(window, h), min(window, w))
    cols = _spans(w, ww)
    wins = [(f0, nf, h0, nh, w0, nw) for f0, nf in _spans(f, min(frames, f))
            for h0, nh in _spans(h, wh) for w0, nw in cols]
    chosen = [wins[i] for i in _lattice(len(wins), cap, len(cols))]
    n_max = max(nf * nh * nw for _, nf, _, nh, _, nw in chosen)
    index, mask, counts = [], [], []
    for f0, nf, h0, nh, w0, nw in chosen:
        rows = [(fi * h + hi) * w + wi for fi in range(f0, f0 + nf)
                for hi in range(h0, h0 + nh) for wi in range(w0, w0 + nw)]
        index += rows + [0] * (n_max - len(rows))
        mask += [1.0] * len(rows) + [0.0] * (n_max - len(rows))
        counts.append(len(rows))
    return _Plan(torch.tensor(index), torch.tensor(mask).view(len(chosen), n_max, 1),
                 tuple(counts), len(wins), torch.tensor(counts, dtype=torch.float64),
                 tuple(chosen))


def _consts(plan: _Plan, d: int, var: float) -> tuple[Tensor, ...]:
    """Per window (float64, ``B``): the noise's expected energy ``(k - 1) d var``, its
    Frobenius terms ``2 (d + k) var`` and ``((k - 1) d^2 + (k - 1)^2 d) var^2``, the rounding
    floor ``1e-10 k d``, the largest rank ``max(1, min(k - 1, d))`` and the counts as float32
    (``B, 1, 1``)."""
    key = (d, var)
    if key not in plan.consts:
        k = plan.k
        plan.consts[key] = (
            (k - 1) * d * var, 2 * (d + k) * var,
            ((k - 1) * d * d + (k - 1) ** 2 * d) * var**2, 1e-10 * k * d,
            (k - 1).clamp(max=d).clamp(min=1), k.float().view(-1, 1, 1))
    return plan.consts[key]


def _ranks(x: Tensor, plan: _Plan, opts: AutoOptions) -> Tensor:
    """Effective rank of each window (float64, ``B``) of a ``(B, n_max, D)`` stack whose padding
    rows ``plan.mask`` zeroes. Every window at once: one batched Gram (samples x samples or
    features x features, whichever is smaller), float32; the per-window rule in float64."""
    d = x.shape[2]
    var = opts.noise_floor**2
    noise, cross, square, floors, top, counts = _consts(plan, d, var)
    mask = plan.mask.to(x.device)
    x = x.mul_(mask)
    x = x.sub_(x.sum(dim=1, keepdim=True).div_(counts.to(x.device))).mul_(mask)  # centred
    gram = x @ x.transpose(1, 2) if x.shape[1] <= d else x.transpose(1, 2) @ x
    if opts.rule == "participation":
        # (sum l)^2 / sum l^2 = trace(G)^2 / ||G||_F^2: no eigendecomposition. The floor's
        # noise (std noise_floor in every entry) is removed from both moments in expectation,
        # cross terms with the signal included; a centred window's rank is at most n - 1.
        moments = torch.stack((gram.diagonal(dim1=1, dim2=2).sum(dim=1),  # trace = sum lambda
                               torch.linalg.vector_norm(gram, dim=(1, 2))))
        energy, fro = moments.cpu().double().unbind()
        fro = fro.square()
        signal = energy - noise
        fro = fro - cross * signal - square
        pr = torch.where(fro > 0, signal.square() / fro, float(d))
        return torch.where(signal > floors, torch.minimum(pr, top), 0.0)
    lam = torch.linalg.eigvalsh(gram.double()).flip(-1)  # descending
    edge = torch.tensor([max(var * (math.sqrt(max(k - 1, 1)) + math.sqrt(d)) ** 2, 1e-10 * k * d)
                         for k in plan.counts], dtype=torch.float64)
    sig = torch.where(lam > edge.to(lam.device)[:, None], lam, torch.zeros_like(lam))
    total = sig.sum(dim=-1, keepdim=True)
    r = (torch.cumsum(sig, dim=-1) < opts.energy * total).sum(dim=-1) + 1
    return torch.where(total.squeeze(-1) > 0, r, torch.zeros_like(r)).double().cpu()


def window_ranks(grid: Tensor | TokenGrid, opts: AutoOptions, *,
                 video: bool = False) -> tuple[float, int, int]:
    """``(rank, windows, computed)`` for a ``(F, H, W, D)`` token grid (or a
    :class:`~vllm_tokenprune.budget.grids.TokenGrid` not yet read): the sum of its windows'
    ranks, the number of windows, and how many were computed. Above ``max_windows`` windows, a
    fixed lattice of them is computed (and only their tokens are read) and the sum is scaled by
    rows (all rows / rows computed). ``video``: the frames are consecutive in time,
    ``window_frames`` of them share a window (otherwise, as LLaVA-NeXT's tiles, every frame is
    windowed alone)."""
    if isinstance(grid, TokenGrid):
        f, h, w, d = grid.shape
    elif grid.dim() != 4 or grid.numel() == 0:
        raise ValueError(f"grid must be a non-empty (F, H, W, D) tensor, got {tuple(grid.shape)}")
    else:
        f, h, w, d = grid.shape
    if f * h * w * d == 0:
        raise ValueError(f"grid must be non-empty, got {(f, h, w, d)}")
    plan = _plan((f, h, w), opts.window, opts.window_frames if video else 1, opts.max_windows)
    if isinstance(grid, TokenGrid) and len(plan.counts) < plan.windows:
        # a lattice: read only its windows' tokens, straight from the pixels
        x = grid.windows(plan.spans, plan.mask.shape[1])
    else:
        if isinstance(grid, TokenGrid):
            grid = grid.tensor()
        x = grid.reshape(f * h * w, d).float().index_select(0, plan.index.to(grid.device))
    ranks = _ranks(x.view(len(plan.counts), -1, d), plan, opts)
    return float(ranks.sum()) * (f * h * w) / sum(plan.counts), plan.windows, len(plan.counts)


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
