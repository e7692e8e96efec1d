"""Token grids: one descriptor row per language-model token, read from preprocessed pixels.

Runs in the API server process (the multimodal processor), on the HF image processor's output,
before the vision encoder. Torch and numpy; no vLLM import.

A token's descriptor is a fixed point sample (a regular lattice) of the pixels it covers,
``sample_rows x samples`` per token, converted back to pixel units (``x * image_std``, so
``[0, 1]`` brightness steps; the per-channel mean does not matter, the estimator centres). Point
samples, not averages: the read touches only the sampled pixels, and it keeps the pixel noise at
its real level, so the noise floor of :class:`~vllm_tokenprune.budget.auto.AutoOptions` is in
plain pixel units whatever the lattice. Per patch: ``samples / merge`` columns and
``sample_rows / merge`` rows, each at most ``patch / 2`` (a stride of at least 2 pixels),
centred in the patch.

Colour (``channel``): every channel (``D`` = samples x 3), one channel, or ``MOSAIC`` (the
default of ``auto``): one channel per sample, so that a token's descriptor still sees colour edges
while reading a third of the values. Where tokens merge patches (Qwen-VL), the mosaic reads a
patch's first sample row in green and its second in red (the merge block's diagonal patches) or
blue (the other two): each sampled row of a patch is one cache line of the processor's
patch-major rows, two per patch instead of six. Where a token is one patch (LLaVA), the samples
follow a Bayer pattern (G R / B G by sample row and column). Qwen-VL's defaults (4 x 4 per token,
2 x 2 per patch): ``D = 16`` in mosaic, 48 with every channel. ``docs/budgets.md`` has what the
mosaic changes in the counts and the cost.

Layouts:

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (:func:`qwen_token_view`): ``pixel_values`` is
  ``(t * h * w, C * T * P * P)`` for an item of patch grid ``(t, h, w)``; the HF processor orders
  the rows so that each ``merge x merge`` block of patches (one LM token) is contiguous. Only the
  first of the ``T`` frames of a temporal patch is read (for an image both are the same frame).
* LLaVA-1.5 / LLaVA-NeXT (:func:`patch_token_view`): ``(C, H, W)`` tiles, one LM token per
  ``P x P`` patch (NeXT: the base image and every any-resolution tile, one frame each).

The ``*_view`` functions return a :class:`TokenGrid`: the processor's pixels as a flat array (no
copy, whatever their dtype: vLLM's Qwen-VL pixels are uint8) and the ``(F, H, W, D)`` offsets of
the sampled values in it (computed once per shape and options, then cached), nothing read yet:
:func:`~vllm_tokenprune.budget.auto.estimate_keep` gathers the windows it computes in one
``numpy.take`` (:meth:`TokenGrid.take`); ``TokenGrid.tensor()`` and the ``*_grid`` functions read
it all. Numpy, not torch, for these small reads: one numpy call costs a few microseconds, one
eager torch call 10-20 (``docs/budgets.md``, "Cost").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["MOSAIC", "TokenGrid", "as_numpy", "dense_grid", "patch_token_grid",
           "patch_token_view", "per_patch", "qwen_token_grid", "qwen_token_view",
           "sample_offsets"]

#: ``channel`` value: one colour channel per sample (module docstring).
MOSAIC = -2

#: The Bayer cell (LLaVA's mosaic): channel by (row parity, column parity): G R / B G.
_BAYER = ((1, 0), (2, 1))


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
    (None if they differ)."""
    factor = np.asarray([std[c] for c in channels], dtype=np.float32)
    factor.setflags(write=False)
    return factor, (float(factor[0]) if (factor == factor[0]).all() else None)


@dataclass(frozen=True, eq=False)
class TokenGrid:
    """A token grid not yet read: ``source``, the pixels as a flat array (no copy; their own
    dtype), ``index``, the ``(F, H, W, D)`` offsets of each token's sampled values in it (shared
    and cached: never written), ``factor``, each of the ``D`` values' factor to pixel units
    (``image_std`` of its channel), ``uniform``, the one factor of them all (None if they
    differ), and ``key``, naming the index (layout, shape, sampling) for the estimator's caches.
    :meth:`tensor` reads all of it; :meth:`take` the offsets asked for (the window lattice of
    :mod:`.auto` reads a fifth of a 16,384-token image)."""

    source: np.ndarray
    index: np.ndarray
    factor: np.ndarray
    uniform: float | None
    key: tuple[Any, ...]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        f, h, w, d = self.index.shape
        return f, h, w, d

    def tensor(self) -> Tensor:
        """``(F, H, W, D)`` float32 in pixel units."""
        out = np.multiply(self.source[self.index], self.factor, dtype=np.float32)
        return torch.from_numpy(out)

    def take(self, index: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None
             ) -> np.ndarray:
        """The values at ``index`` (offsets from :attr:`index`) into ``out`` (float32, the
        same shape), not scaled (the estimator applies :attr:`factor` after centring): one
        gather, and one conversion for pixels that are not float32 (through ``scratch``, an
        array of the pixels' dtype and ``out``'s shape; None: a new one)."""
        if self.source.dtype == np.float32:
            return self.source.take(index, out=out, mode="clip")
        if scratch is None:
            scratch = np.empty(index.shape, dtype=self.source.dtype)
        self.source.take(index, out=scratch, mode="clip")
        out[...] = scratch
        return out


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
def _qwen_index(t: int, h: int, w: int, m: int, p: int, tp: int, c: int, rows: tuple[int, ...],
                cols: tuple[int, ...], channel: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Offsets ``(t, h/m, w/m, D)`` into an item's flat ``(t*h*w, C*T*P*P)`` rows, and each
    value's channel. Value order: patch of the merge block (row, column), then channel (every
    channel) and sample row, sample column; mosaic: patch, sample row, sample column."""
    hh, ww = h // m, w // m
    row = np.arange(t * hh * ww * m * m).reshape(t, hh, ww, m, m)  # patch rows, merge blocks
    values: list[tuple[int, int, int, int, int]] = []  # (mi, mj, channel, r, k)
    for mi in range(m):
        for mj in range(m):
            for ci in range(c) if channel == -1 else [channel]:
                for ri, r in enumerate(rows):
                    for ki, k in enumerate(cols):
                        if channel == MOSAIC:
                            ci = (_BAYER[ri % 2][ki % 2] if m == 1 else
                                  1 if ri % 2 == 0 else _BAYER[0][1] if (mi + mj) % 2 == 0
                                  else _BAYER[1][0])
                        values.append((mi, mj, ci, r, k))
    v = np.array(values, dtype=np.intp)
    col = v[:, 2] * (tp * p * p) + v[:, 3] * p + v[:, 4]  # frame 0 of each temporal patch
    patch = row[..., v[:, 0], v[:, 1]]  # (t, hh, ww, D)
    index = patch * (c * tp * p * p) + col
    index.setflags(write=False)
    return index, tuple(int(c) for c in v[:, 2])


@functools.lru_cache(maxsize=32)
def _patch_index(f: int, c: int, hh: int, ww: int, p: int, rows: tuple[int, ...],
                 cols: tuple[int, ...], channel: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Offsets ``(f, hh/p, ww/p, D)`` into flat ``(f, C, hh, ww)`` tiles, and each value's
    channel. Value order: channel (every channel), sample row, sample column; mosaic: sample
    row, sample column."""
    gh, gw = hh // p, ww // p
    values = [(_BAYER[ri % 2][ki % 2] if channel == MOSAIC else ci, r, k)
              for ci in (range(c) if channel == -1 else [channel])
              for ri, r in enumerate(rows) for ki, k in enumerate(cols)]
    v = np.array(values, dtype=np.intp)
    fi = np.arange(f).reshape(f, 1, 1, 1)
    y = (np.arange(gh) * p).reshape(1, gh, 1, 1) + v[:, 1]
    x = (np.arange(gw) * p).reshape(1, 1, gw, 1) + v[:, 2]
    index = ((fi * c + v[:, 0]) * hh + y) * ww + x
    index.setflags(write=False)
    return index, tuple(int(c) for c in v[:, 0])


@functools.lru_cache(maxsize=16)
def _dense_index(f: int, h: int, w: int, d: int) -> np.ndarray:
    index = np.arange(f * h * w * d, dtype=np.intp).reshape(f, h, w, d)
    index.setflags(write=False)
    return index


def dense_grid(grid: Tensor | np.ndarray) -> TokenGrid:
    """A :class:`TokenGrid` over an already read ``(F, H, W, D)`` grid (values in pixel
    units)."""
    x = np.ascontiguousarray(as_numpy(grid), dtype=np.float32)
    f, h, w, d = x.shape
    return TokenGrid(_flat(x), _dense_index(f, h, w, d), *_factors((1.0,), (0,) * d),
                     ("dense", f, h, w, d))


def qwen_token_grid(pixel_values: Tensor, grid_thw: Sequence[int], **kwargs: Any) -> Tensor:
    """The ``(t, h / merge, w / merge, D)`` float32 token grid of one Qwen-VL item
    (:func:`qwen_token_view`, read whole)."""
    return qwen_token_view(pixel_values, grid_thw, **kwargs).tensor()


def qwen_token_view(pixel_values: Tensor | np.ndarray, grid_thw: Sequence[int], *,
                    patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                    channels: int = 3, samples: int = 4, sample_rows: int = 4,
                    image_std: Sequence[float] | float | None = None,
                    channel: int | None = None) -> TokenGrid:
    """The token grid of one Qwen-VL item, ``(t, h / merge, w / merge)`` tokens, not yet read.

    ``pixel_values``: this item's rows of the processor's flattened patches,
    ``(t * h * w, C * T * P * P)``; ``grid_thw``: its ``(t, h, w)`` patch grid; ``samples`` and
    ``sample_rows``: columns and rows per token (divided by ``merge`` per patch); ``channel``:
    that colour channel only, ``MOSAIC``, or None / -1: every channel."""
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if h % m or w % m:
        raise ValueError(f"grid {(t, h, w)} is not a multiple of merge_size={m}")
    expected = (t * h * w, channels * tp * p * p)
    if tuple(pixel_values.shape) != expected:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; grid {(t, h, w)} with patch "
            f"{p}, temporal patch {tp} and {channels} channels needs {expected}")
    rows = tuple(sample_offsets(p, per_patch(sample_rows, m, p)))
    cols = tuple(sample_offsets(p, per_patch(samples, m, p)))
    ch = _channel_of(channel, channels)
    index, chans = _qwen_index(t, h, w, m, p, tp, channels, rows, cols, ch)
    return TokenGrid(_flat(as_numpy(pixel_values)), index,
                     *_factors(_std(image_std, channels), chans),
                     ("qwen", t, h, w, m, p, tp, channels, rows, cols, ch))


def patch_token_grid(pixel_values: Tensor, **kwargs: Any) -> Tensor:
    """The ``(F, H / P, W / P, D)`` float32 token grid of LLaVA tiles (:func:`patch_token_view`,
    read whole)."""
    return patch_token_view(pixel_values, **kwargs).tensor()


def patch_token_view(pixel_values: Tensor | np.ndarray, *, patch_size: int = 14,
                     samples: int = 4, sample_rows: int = 4,
                     image_std: Sequence[float] | float | None = None,
                     channel: int | None = None) -> TokenGrid:
    """The ``(F, H / P, W / P)`` token grid (not yet read) of ``(C, H, W)`` tiles (a single tile, or
    ``(F, C, H, W)``), one token per ``P x P`` patch (LLaVA's CLIP tower); a remainder
    narrower than a patch is ignored, as the patch embedding does; ``channel``: that colour
    channel only, ``MOSAIC``, or None / -1: every channel."""
    x = as_numpy(pixel_values)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be (C, H, W) or (F, C, H, W), got {tuple(x.shape)}")
    f, c, hh, ww = x.shape
    p = patch_size
    if hh // p < 1 or ww // p < 1:
        raise ValueError(f"tiles of {hh}x{ww} pixels hold no {p}-pixel patch")
    rows = tuple(sample_offsets(p, per_patch(sample_rows, 1, p)))
    cols = tuple(sample_offsets(p, per_patch(samples, 1, p)))
    ch = _channel_of(channel, c)
    index, chans = _patch_index(f, c, hh, ww, p, rows, cols, ch)
    return TokenGrid(_flat(x), index, *_factors(_std(image_std, c), chans),
                     ("patch", f, c, hh, ww, p, rows, cols, ch))
