"""Token grids: one descriptor row per language-model token, read from preprocessed pixels.

Runs in the API server process (the multimodal processor), on the HF image processor's output,
before the vision encoder. Torch and numpy; no vLLM import.

A token's descriptor is a fixed point sample (a regular lattice) of the pixels it covers,
``sample_rows`` rows of ``samples`` columns, converted back to pixel units (``x * image_std``, so
``[0, 1]`` brightness steps; the per-channel mean does not matter, the estimator centres;
per-channel factors within 10% of each other, as CLIP's and ImageNet's, share their mean).
Point samples, not averages: the read touches only the sampled pixels, and it keeps the pixel
noise at its real level, so the noise floor of :class:`~vllm_tokenprune.budget.auto.AutoOptions`
is in plain pixel units whatever the lattice. Each sample row lies within one patch, its
``samples`` columns centred in the patch at a stride of at least 2 pixels: where a token is one
patch (LLaVA) the token's ``sample_rows`` rows; where tokens merge ``merge x merge`` patches
(Qwen-VL) only the merge block's diagonal patches are read, ``sample_rows / merge`` rows each,
so that the token's rows still cover its whole height and its columns both halves of its
width, while the read touches half of the processor's patch rows (``docs/budgets.md``, "Cost":
the read's cost follows the memory pages and lines it touches more than the values).

Colour (``channel``): every channel (``D`` = rows x columns x 3), one channel, or ``MOSAIC``
(the default of ``auto``): one channel per sample row, the token's rows green, red, green,
blue, so that a token's descriptor still sees colour edges while reading a third of the values,
each sample row one cache line of the processor's output. Defaults (4 rows of 4): ``D = 16``
in mosaic, 48 with every channel.

Layouts:

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (:func:`qwen_token_view`): ``pixel_values`` is
  ``(t * h * w, C * T * P * P)`` for an item of patch grid ``(t, h, w)``; the HF processor orders
  the rows so that each ``merge x merge`` block of patches (one LM token) is contiguous. Only the
  first of the ``T`` frames of a temporal patch is read (for an image both are the same frame).
* LLaVA-1.5 / LLaVA-NeXT (:func:`patch_token_view`): ``(C, H, W)`` tiles, one LM token per
  ``P x P`` patch (NeXT: the base image and every any-resolution tile, one frame each).

The ``*_view`` functions return a :class:`TokenGrid`: the processor's pixels as a flat array (no
copy, whatever their dtype: vLLM's Qwen-VL pixels are uint8; a whole output, the item from its
first row or tile) and where each token's sampled values lie in it (strides per token step and
each value's offset), nothing read yet: :mod:`.auto` gathers the windows it computes in one
``numpy.take``; ``TokenGrid.tensor()`` and the ``*_grid`` functions read it all. Numpy, not
torch, for these small reads: one numpy call costs a few microseconds, one eager torch call
10-20 (``docs/budgets.md``, "Cost").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["MOSAIC", "PackedIndex", "TokenGrid", "as_numpy", "check_qwen_item", "dense_grid",
           "packed_index", "patch_token_grid", "patch_token_view", "per_patch",
           "qwen_sampling", "qwen_token_grid", "qwen_token_view", "sample_offsets"]

#: ``channel`` value: one colour channel per sample (module docstring).
MOSAIC = -2

#: The mosaic's channel by the token's sample row (cycling): G, R, G, B.
_MOSAIC_ROWS = (1, 0, 1, 2)

#: Channels whose factors to pixel units are within this ratio share one (their mean).
UNIFORM_WITHIN = 1.1


def sample_offsets(patch_size: int, samples: int) -> list[int]:
    """Pixel offsets of ``samples`` points spread over a patch of ``patch_size`` pixels: a
    stride of ``patch_size // samples``, the lattice centred in the patch."""
    if not 1 <= samples <= patch_size:
        raise ValueError(f"samples per patch must be in [1, {patch_size}], got {samples}")
    stride = patch_size // samples
    start = (patch_size - samples * stride) // 2 + stride // 2
    return [start + i * stride for i in range(samples)]


def per_patch(samples_per_token: int, merge: int, patch_size: int) -> int:
    """Samples per patch side for ``samples_per_token`` per token side."""
    return max(1, min(patch_size // 2, round(samples_per_token / merge)))


def as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """``x`` as a numpy array sharing its memory where it can (a CPU tensor of a numpy dtype;
    bfloat16 is converted to float32, a device tensor copied to the host)."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return x.numpy()  # a CPU tensor of a numpy dtype without grad: one call, no copy
    except (TypeError, RuntimeError):
        pass
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.numpy()


def _std(image_std: Sequence[float] | float | None, channels: int) -> tuple[float, ...]:
    if image_std is None:
        return (1.0,) * channels
    if isinstance(image_std, (int, float)):
        return (float(image_std),) * channels
    std = tuple(float(v) for v in image_std)
    if len(std) != channels:
        raise ValueError(f"image_std has {len(std)} values for {channels} channels")
    return std


@functools.lru_cache(maxsize=64)
def _factors(std: tuple[float, ...], channels: tuple[int, ...]) -> tuple[np.ndarray, float | None]:
    """Each value's factor to pixel units (float32, read-only) and the one factor of them all
    (None if they differ). The factors of the channels read, where they are within
    ``UNIFORM_WITHIN`` of each other (CLIP's 0.261-0.276, ImageNet's 0.224-0.229: a per-channel
    normalization), are replaced by their mean: the values are then within 5% of pixel units,
    and the estimator applies one factor to its moments instead of scaling every value."""
    read = sorted({std[c] for c in channels})
    if read[-1] <= UNIFORM_WITHIN * read[0]:
        one = sum(read) / len(read) if len(read) > 1 else read[0]
        factor = np.full(len(channels), one, dtype=np.float32)
    else:
        factor = np.asarray([std[c] for c in channels], dtype=np.float32)
    factor.setflags(write=False)
    return factor, (float(factor[0]) if (factor == factor[0]).all() else None)


@dataclass(frozen=True, eq=False)
class TokenGrid:
    """A token grid not yet read: ``source``, the pixels as a flat array (no copy; their own
    dtype); where each token's ``D`` sampled values lie in it, as a separable layout: token
    ``(f, y, x)``'s value ``d`` is at ``base + f * strides[0] + y * strides[1] + x * strides[2]
    + offsets[d]`` (every layout here is: patches and tiles are regular; ``base``: where the
    item starts in a whole processor output); ``shape``, the grid's
    ``(F, H, W, D)``; ``factor``, each value's factor to pixel units (``image_std`` of its
    channel) and ``uniform``, the one factor of them all (None if they differ). :meth:`tensor`
    reads all of it; the estimator
    (:mod:`.auto`) reads only the windows it computes (a fifth of a 16,384-token image), through
    offsets made from the strides."""

    source: np.ndarray
    shape: tuple[int, int, int, int]
    strides: tuple[int, int, int]
    offsets: np.ndarray  # (D,) intp, read-only
    factor: np.ndarray
    uniform: float | None
    base: int = 0  # token (0, 0, 0)'s place in source: the item's first pixel
    #: each token's values lie in its own block of ``strides[2]`` elements, the blocks one after
    #: another in raster order (Qwen-VL's merged patch rows; a dense grid): the gather offsets
    #: of a grid of any size are then made from one kept index (:func:`packed_index`)
    packed: bool = False

    @property
    def index(self) -> np.ndarray:
        """The ``(F, H, W, D)`` offsets of every token's values in :attr:`source`."""
        f, h, w, _ = self.shape
        sf, sy, sx = self.strides
        return (self.base + np.arange(f).reshape(f, 1, 1, 1) * sf
                + np.arange(h).reshape(1, h, 1, 1) * sy + np.arange(w).reshape(1, 1, w, 1) * sx
                + self.offsets)

    def tensor(self) -> Tensor:
        """``(F, H, W, D)`` float32 in pixel units."""
        out = np.multiply(self.source[self.index], self.factor, dtype=np.float32)
        return torch.from_numpy(out)


#: The most bytes a kept :class:`PackedIndex` grows to (64 MiB holds 2**19 tokens of 16 values;
#: larger items make their index when read).
PACKED_INDEX_MAX_BYTES = 64 << 20


class PackedIndex:
    """Where the tokens of a packed grid (:attr:`TokenGrid.packed`) keep their values, for any
    grid size: token ``i``'s value ``d`` at ``i * block + offsets[d]`` from the item's first
    pixel. :meth:`rows` gives the first ``tokens`` rows, ``(tokens, D)``, a slice of one kept
    array grown to a power of two (at least 1,024 tokens) as larger items come: the gather
    offsets of an image of a new size are a reordered slice of it
    (:meth:`~vllm_tokenprune.budget.windows.Plan.packed_offsets`), not sums made from its
    strides (``docs/budgets.md``, "Cost"). Read-only arrays; a thread that grows it swaps the
    array whole."""

    def __init__(self, block: int, offsets: np.ndarray) -> None:
        self.block = block
        self.offsets = offsets
        self._index = np.empty((0, len(offsets)), dtype=np.intp)

    def rows(self, tokens: int) -> np.ndarray:
        index = self._index
        if len(index) >= tokens:
            return index[:tokens]
        size = 1 << max(10, (tokens - 1).bit_length())
        made = np.add.outer(np.arange(size, dtype=np.intp) * self.block, self.offsets)
        made.setflags(write=False)
        if made.nbytes <= PACKED_INDEX_MAX_BYTES:
            self._index = made
        return made[:tokens]


@functools.lru_cache(maxsize=16)
def packed_index(block: int, offsets: bytes) -> PackedIndex:
    """The kept :class:`PackedIndex` of token blocks of ``block`` elements and these value
    offsets (``intp`` bytes)."""
    values = np.frombuffer(offsets, dtype=np.intp)
    if len(values) == 0 or values.min() < 0 or values.max() >= block:
        raise ValueError(f"value offsets must lie in a token's block of {block}")
    return PackedIndex(block, values)


def _flat(x: np.ndarray) -> np.ndarray:
    """``x`` as one flat array (a view when it is contiguous, as the processors' outputs are)."""
    return x.reshape(-1)


def _channel_of(channel: int | None, channels: int) -> int:
    c = -1 if channel is None else int(channel)
    if c not in (MOSAIC, -1) and not 0 <= c < channels:
        raise ValueError(f"channel {channel} out of range for {channels} channels "
                         f"(-1: every channel, {MOSAIC}: mosaic)")
    return c


@functools.lru_cache(maxsize=32)
def _qwen_values(m: int, p: int, tp: int, c: int, rows: tuple[int, ...], cols: tuple[int, ...],
                 channel: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each value's offset in a token's ``m * m`` flat patch rows (``C * T * P * P`` each), and
    its channel: the ``rows`` and ``cols`` of the merge block's diagonal patches ``(i, i)``.
    Value order: diagonal patch, then channel (every channel) and sample row, sample column;
    mosaic: patch, sample row (the token's sample rows green, red, green, blue), sample
    column. Only frame 0 of each temporal patch."""
    values: list[tuple[int, int, int, int]] = []  # (patch, channel, r, k)
    for mi in range(m):
        for ci in range(c) if channel == -1 else [channel]:
            for ri, r in enumerate(rows):
                for k in cols:
                    if channel == MOSAIC:
                        ci = _MOSAIC_ROWS[(mi * len(rows) + ri) % 4]
                    values.append((mi, ci, r, k))
    v = np.array(values, dtype=np.intp)
    row = c * tp * p * p
    offsets = (v[:, 0] * m + v[:, 0]) * row + v[:, 1] * (tp * p * p) + v[:, 2] * p + v[:, 3]
    offsets.setflags(write=False)
    return offsets, tuple(int(c) for c in v[:, 1])


@functools.lru_cache(maxsize=32)
def _patch_values(c: int, hh: int, ww: int, rows: tuple[int, ...], cols: tuple[int, ...],
                  channel: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each value's offset from its patch's corner in flat ``(C, hh, ww)`` tiles, and its
    channel. Value order: channel (every channel), sample row, sample column; mosaic: sample
    row (green, red, green, blue), sample column."""
    v = np.array([(_MOSAIC_ROWS[ri % 4] if channel == MOSAIC else ci, r, k)
                  for ci in (range(c) if channel == -1 else [channel])
                  for ri, r in enumerate(rows) for k in cols], dtype=np.intp)
    offsets = (v[:, 0] * hh + v[:, 1]) * ww + v[:, 2]
    offsets.setflags(write=False)
    return offsets, tuple(int(c) for c in v[:, 0])


@functools.lru_cache(maxsize=16)
def _dense_values(d: int) -> np.ndarray:
    offsets = np.arange(d, dtype=np.intp)
    offsets.setflags(write=False)
    return offsets


def dense_grid(grid: Tensor | np.ndarray) -> TokenGrid:
    """A :class:`TokenGrid` over an already read ``(F, H, W, D)`` grid (values in pixel
    units)."""
    x = np.ascontiguousarray(as_numpy(grid), dtype=np.float32)
    f, h, w, d = x.shape
    return TokenGrid(_flat(x), (f, h, w, d), (h * w * d, w * d, d), _dense_values(d),
                     *_factors((1.0,), (0,) * d), packed=True)


def qwen_token_grid(pixel_values: Tensor, grid_thw: Sequence[int], **kwargs: Any) -> Tensor:
    """The ``(t, h / merge, w / merge, D)`` float32 token grid of one Qwen-VL item
    (:func:`qwen_token_view`, read whole)."""
    return qwen_token_view(pixel_values, grid_thw, **kwargs).tensor()


def check_qwen_item(shape: tuple[int, ...], grid_thw: tuple[int, int, int], m: int, p: int,
                    tp: int, channels: int, start: int) -> None:
    """Refuse a Qwen-VL item whose patch grid is not a multiple of the merge or whose rows
    (from row ``start``) the pixels of ``shape`` do not hold."""
    t, h, w = grid_thw
    if h % m or w % m:
        raise ValueError(f"grid {(t, h, w)} is not a multiple of merge_size={m}")
    rows_in, width = (shape + (0, 0))[:2]
    if (len(shape) != 2 or width != channels * tp * p * p or start < 0
            or rows_in < start + t * h * w):
        raise ValueError(
            f"pixel_values has shape {shape}; grid {(t, h, w)} with patch "
            f"{p}, temporal patch {tp} and {channels} channels needs "
            f"{(start + t * h * w, channels * tp * p * p)} (rows {start} on)")


def qwen_token_view(pixel_values: Tensor | np.ndarray, grid_thw: Sequence[int], *,
                    patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                    channels: int = 3, samples: int = 4, sample_rows: int = 4,
                    image_std: Sequence[float] | float | None = None,
                    channel: int | None = None, start: int = 0) -> TokenGrid:
    """The token grid of one Qwen-VL item, ``(t, h / merge, w / merge)`` tokens, not yet read.

    ``pixel_values``: the processor's flattened patches, ``(rows, C * T * P * P)``, the item's
    ``t * h * w`` from row ``start`` (a whole output: no slicing per item); ``grid_thw``: its
    ``(t, h, w)`` patch grid; ``samples``: columns per sample row (within a diagonal patch);
    ``sample_rows``: rows per token (divided by ``merge`` per patch); ``channel``: that colour
    channel only, ``MOSAIC``, or None / -1: every channel."""
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    check_qwen_item(tuple(pixel_values.shape), (t, h, w), m, p, tp, channels, start)
    width = channels * tp * p * p
    offsets, factor, uniform = qwen_sampling(
        m, p, tp, channels, samples, sample_rows,
        image_std if image_std is None or isinstance(image_std, (int, float))
        else tuple(image_std), channel)
    sx = m * m * width  # one token: m * m patch rows
    hh, ww = h // m, w // m
    return TokenGrid(_flat(as_numpy(pixel_values)), (t, hh, ww, len(offsets)),
                     (hh * ww * sx, ww * sx, sx), offsets, factor, uniform, start * width,
                     packed=True)  # a token's m * m patch rows hold all its values


@functools.lru_cache(maxsize=32)
def qwen_sampling(m: int, p: int, tp: int, channels: int, samples: int, sample_rows: int,
                   image_std: tuple[float, ...] | float | None, channel: int | None
                   ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """What a Qwen-VL token grid reads, whatever its size: the values' offsets in a token's
    patch rows and their factors to pixel units (and the one factor): one look-up per
    image."""
    rows = tuple(sample_offsets(p, per_patch(sample_rows, m, p)))
    cols = tuple(sample_offsets(p, per_patch(samples, 1, p)))  # within one diagonal patch
    ch = _channel_of(channel, channels)
    offsets, chans = _qwen_values(m, p, tp, channels, rows, cols, ch)
    return (offsets, *_factors(_std(image_std, channels), chans))


def patch_token_grid(pixel_values: Tensor, **kwargs: Any) -> Tensor:
    """The ``(F, H / P, W / P, D)`` float32 token grid of LLaVA tiles (:func:`patch_token_view`,
    read whole)."""
    return patch_token_view(pixel_values, **kwargs).tensor()


def patch_token_view(pixel_values: Tensor | np.ndarray, *, patch_size: int = 14,
                     samples: int = 4, sample_rows: int = 4,
                     image_std: Sequence[float] | float | None = None,
                     channel: int | None = None, first: int = 0,
                     count: int | None = None) -> TokenGrid:
    """The ``(F, H / P, W / P)`` token grid (not yet read) of ``(C, H, W)`` tiles (a single tile, or
    ``(F, C, H, W)``: ``count`` of them from tile ``first``, default all), one token per
    ``P x P`` patch (LLaVA's CLIP tower); a remainder narrower than a patch is ignored, as the
    patch embedding does; ``channel``: that colour channel only, ``MOSAIC``, or None / -1:
    every channel."""
    x = as_numpy(pixel_values)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be (C, H, W) or (F, C, H, W), got {tuple(x.shape)}")
    f, c, hh, ww = x.shape
    if count is None:
        count = f - first
    if first < 0 or count < 1 or first + count > f:
        raise ValueError(f"tiles {first}..{first + count - 1} of {f}")
    f = count
    p = patch_size
    if hh // p < 1 or ww // p < 1:
        raise ValueError(f"tiles of {hh}x{ww} pixels hold no {p}-pixel patch")
    rows = tuple(sample_offsets(p, per_patch(sample_rows, 1, p)))
    cols = tuple(sample_offsets(p, per_patch(samples, 1, p)))
    ch = _channel_of(channel, c)
    offsets, chans = _patch_values(c, hh, ww, rows, cols, ch)
    return TokenGrid(_flat(x), (f, hh // p, ww // p, len(offsets)), (c * hh * ww, p * ww, p),
                     offsets, *_factors(_std(image_std, c), chans), first * c * hh * ww)
