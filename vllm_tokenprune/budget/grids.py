"""Token grids: one descriptor row per language-model token, read from preprocessed pixels.

Runs in the API server process (the multimodal processor), on the HF image processor's output,
before the vision encoder. Torch and numpy; no vLLM import.

A token's descriptor is a fixed point sample (a regular lattice) of the pixels it covers,
``sample_rows x samples`` per token in every channel, converted back to pixel units
(``x * image_std``, so ``[0, 1]`` brightness steps; the per-channel mean does not matter, the
estimator centres). Point samples, not averages: the gather reads only the sampled pixels, and it
keeps the pixel noise at its real level, so the noise floor of
:class:`~vllm_tokenprune.budget.auto.AutoOptions` is in plain pixel units whatever the lattice.
Per patch: ``samples / merge`` columns and ``sample_rows / merge`` rows, each at most ``patch /
2`` (a stride of at least 2 pixels), centred in the patch. Qwen-VL (14-pixel patches, 2x2 merge),
defaults 4 x 4 per token: 2 columns x 2 rows per patch, ``D = 48``; LLaVA (a 14-pixel patch is a
token): 4 x 4, ``D = 48``. The estimator's cost grows with ``D`` (the read, and the Gram
``D^2 n`` per window); ``docs/budgets.md`` has what fewer or more samples change.

Layouts:

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (:func:`qwen_token_grid`): ``pixel_values`` is
  ``(t * h * w, C * T * P * P)`` for an item of patch grid ``(t, h, w)``; the HF processor orders
  the rows so that each ``merge x merge`` block of patches (one LM token) is contiguous. Only the
  first of the ``T`` frames of a temporal patch is read (for an image both are the same frame).
* LLaVA-1.5 / LLaVA-NeXT (:func:`patch_token_grid`): ``(C, H, W)`` tiles, one LM token per
  ``P x P`` patch (NeXT: the base image and every any-resolution tile, one frame each).

The ``*_view`` functions return a :class:`TokenGrid`: the sampled pixels as a strided numpy view
of the processor's tensor (no copy, whatever its dtype: vLLM's Qwen-VL pixels are uint8), nothing
read yet: :func:`~vllm_tokenprune.budget.auto.estimate_keep` copies the sampled pixels of the
windows it computes straight into its window stack (:meth:`TokenGrid.fill`), converting to float32
on the way; ``TokenGrid.tensor()`` and the ``*_grid`` functions read it all.
Numpy, not torch, for these small strided reads: one numpy call costs a few microseconds, one
eager torch call 10-20 (``docs/budgets.md``, "Cost").

The result is ``(F, H, W, D)`` float32: ``F`` frames (video token steps, or tiles), the ``H x W``
token grid, ``D`` samples per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TokenGrid", "as_numpy", "patch_token_grid", "patch_token_view", "per_patch",
           "qwen_token_grid", "qwen_token_view", "sample_offsets"]


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
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.numpy()


def _std(image_std: Sequence[float] | float | None, channels: int) -> np.ndarray:
    if image_std is None:
        return np.ones(channels, dtype=np.float32)
    if isinstance(image_std, (int, float)):
        return np.full(channels, image_std, dtype=np.float32)
    std = np.asarray(list(image_std), dtype=np.float32)
    if std.size != channels:
        raise ValueError(f"image_std has {std.size} values for {channels} channels")
    return std


#: One copy into a window stack: the grid's ``(F, H, W)`` slices, how the source splits into
#: ``(windows, rows)`` per axis (None: one window, no split) and where it goes in the stack.
Copy = tuple[tuple[slice, slice, slice], "tuple[int, ...] | None", tuple[Any, ...]]


@dataclass(frozen=True)
class TokenGrid:
    """A token grid not yet read: ``view``, a strided ``(F, H, W, *S)`` numpy view of the sampled
    pixels (no copy; ``S`` holds the channel at ``channel_dim``, in the pixels' own dtype), and
    ``std``, the per-channel factor to pixel units. :meth:`tensor` reads all of it; :meth:`fill`
    only the windows asked for (the window lattice of :mod:`.auto` reads a fifth of a
    16,384-token image)."""

    view: np.ndarray
    std: np.ndarray
    channel_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        f, h, w = self.view.shape[:3]
        return f, h, w, math.prod(self.view.shape[3:])

    @functools.cached_property
    def factor(self) -> np.ndarray:
        """The per-channel factor for each of the ``D`` values of a token (float32)."""
        shape = [1] * (self.view.ndim - 3)
        shape[self.channel_dim - 3] = -1
        return np.ascontiguousarray(np.broadcast_to(
            self.std.reshape(shape), self.view.shape[3:]).reshape(-1))

    def tensor(self) -> Tensor:
        """``(F, H, W, D)`` float32 in pixel units (one strided pass)."""
        f, h, w, d = self.shape
        out = np.empty(self.view.shape, dtype=np.float32)
        np.multiply(self.view, self.factor.reshape(self.view.shape[3:]), out=out,
                    dtype=np.float32)
        return torch.from_numpy(out.reshape(f, h, w, d))

    def fill(self, out: np.ndarray, copies: Sequence[Copy]) -> np.ndarray:
        """Copy the sampled pixels into ``out`` (float32, zeros where no copy writes), as the
        window plan of :mod:`.auto` says: each copy is one strided pass over a block of the grid
        (all the full windows of a block at once), converted to float32 on the way, not scaled
        (the estimator applies :attr:`factor` after centring)."""
        v, s = self.view, self.view.shape[3:]
        for (fs, hs, ws), split, dst in copies:
            src = v[fs, hs, ws]
            out[dst] = src if split is None else src.reshape(split + s)
        return out

    @functools.cached_property
    def uniform(self) -> float | None:
        """The one factor of every channel (raw pixels: ``1 / 255``), or None."""
        return float(self.std[0]) if (self.std == self.std[0]).all() else None


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
    that colour channel only (None: every channel)."""
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if h % m or w % m:
        raise ValueError(f"grid {(t, h, w)} is not a multiple of merge_size={m}")
    expected = (t * h * w, channels * tp * p * p)
    if tuple(pixel_values.shape) != expected:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; grid {(t, h, w)} with patch "
            f"{p}, temporal patch {tp} and {channels} channels needs {expected}")
    rows = _lattice_slice(p, per_patch(sample_rows, m, p))
    cols = _lattice_slice(p, per_patch(samples, m, p))
    # the sampled pixels, (t, H, W, m, m, C, rows, cols), frame 0 of each temporal patch
    v = as_numpy(pixel_values).reshape(t, h // m, w // m, m, m, channels, tp, p, p)
    ch = _channels(channel, channels)
    return TokenGrid(v[..., ch, 0, rows, cols], _std(image_std, channels)[ch], 5)


def _channels(channel: int | None, channels: int) -> slice:
    """The channel axis' slice: every channel, or ``channel`` alone (a size-1 axis)."""
    if channel is None:
        return slice(None)
    if not 0 <= channel < channels:
        raise ValueError(f"channel {channel} out of range for {channels} channels")
    return slice(channel, channel + 1)


def _lattice_slice(patch_size: int, samples: int) -> slice:
    """:func:`sample_offsets` as a slice (a regular lattice)."""
    off = sample_offsets(patch_size, samples)
    step = off[1] - off[0] if len(off) > 1 else 1
    return slice(off[0], off[-1] + 1, step)


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
    narrower than a patch is ignored, as the patch embedding does; ``channel``: that colour channel
    only (None: every channel)."""
    x = as_numpy(pixel_values)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be (C, H, W) or (F, C, H, W), got {tuple(x.shape)}")
    f, c, hh, ww = x.shape
    p = patch_size
    gh, gw = hh // p, ww // p
    if gh < 1 or gw < 1:
        raise ValueError(f"tiles of {hh}x{ww} pixels hold no {p}-pixel patch")
    rows = _lattice_slice(p, per_patch(sample_rows, 1, p))
    cols = _lattice_slice(p, per_patch(samples, 1, p))
    # (F, C, gh, P, gw, P) view, sampled rows and columns, tokens first: (F, gh, gw, C, r, k)
    ch = _channels(channel, c)
    v = x[:, ch, :gh * p, :gw * p]
    v = v.reshape(f, v.shape[1], gh, p, gw, p)[:, :, :, rows, :, cols]
    return TokenGrid(v.transpose(0, 2, 4, 1, 3, 5), _std(image_std, c)[ch], 3)
