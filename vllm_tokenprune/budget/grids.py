"""Token grids: one descriptor row per language-model token, read from preprocessed pixels.

Runs in the API server process (the multimodal processor), on the HF image processor's output,
before the vision encoder. Pure torch; no vLLM import.

A token's descriptor is a fixed point sample (a regular lattice) of the pixels it covers,
``sample_rows x samples`` per token in every channel, converted back to pixel units
(``x * image_std``, so ``[0, 1]`` brightness steps; the per-channel mean does not matter, the
estimator centres). Point samples, not averages: the gather reads only the sampled pixels, and it
keeps the pixel noise at its real level, so the noise floor of
:class:`~vllm_tokenprune.budget.auto.AutoOptions` is in plain pixel units whatever the lattice.
Fewer rows than columns: a pixel row is contiguous in memory, so extra columns are nearly free
while every extra row is one more cache line per patch and channel. Per patch: ``samples /
merge`` columns and ``sample_rows / merge`` rows, each at most ``patch / 2`` (a stride of at least
2 pixels), centred in the patch. Qwen-VL (14-pixel patches, 2x2 merge), defaults 8 x 4 per token:
4 columns x 2 rows per patch, ``D = 96``; LLaVA (a 14-pixel patch is a token): 7 x 4, ``D = 84``.

Layouts:

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (:func:`qwen_token_grid`): ``pixel_values`` is
  ``(t * h * w, C * T * P * P)`` for an item of patch grid ``(t, h, w)``; the HF processor orders
  the rows so that each ``merge x merge`` block of patches (one LM token) is contiguous. Only the
  first of the ``T`` frames of a temporal patch is read (for an image both are the same frame).
* LLaVA-1.5 / LLaVA-NeXT (:func:`patch_token_grid`): ``(C, H, W)`` tiles, one LM token per
  ``P x P`` patch (NeXT: the base image and every any-resolution tile, one frame each).

The ``*_view`` functions return a :class:`TokenGrid`: the sampled pixels as a strided view of the
processor's tensor, nothing read yet (:func:`~vllm_tokenprune.budget.auto.estimate_keep` reads
only the tokens of the windows it computes); ``TokenGrid.tensor()`` and the ``*_grid`` functions
read it all (two plain strided copies, see :meth:`TokenGrid.tensor`).

The result is ``(F, H, W, D)`` float32: ``F`` frames (video token steps, or tiles), the ``H x W``
token grid, ``D`` samples per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TokenGrid", "patch_token_grid", "patch_token_view", "per_patch", "qwen_token_grid",
           "qwen_token_view", "sample_offsets"]


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


def _std(image_std: Sequence[float] | float | None, channels: int) -> Tensor:
    if image_std is None:
        return torch.ones(channels)
    if isinstance(image_std, (int, float)):
        return torch.full((channels,), float(image_std))
    std = torch.as_tensor(list(image_std), dtype=torch.float32)
    if std.numel() != channels:
        raise ValueError(f"image_std has {std.numel()} values for {channels} channels")
    return std


@dataclass(frozen=True)
class TokenGrid:
    """A token grid not yet read: ``view``, a strided ``(F, H, W, *S)`` view of the sampled
    pixels (no copy; ``S`` holds the channel at ``channel_dim``), and ``std``, the per-channel
    factor to pixel units. :meth:`tensor` reads all of it; :meth:`rows` only the tokens asked
    for (the window lattice of :mod:`.auto` reads a fifth of a 16,384-token image)."""

    view: Tensor
    std: Tensor
    channel_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        f, h, w = self.view.shape[:3]
        return f, h, w, math.prod(self.view.shape[3:])

    @functools.cached_property
    def _uniform(self) -> float | None:
        """The one factor of every channel (raw pixels: ``1 / 255``), or None."""
        std = self.std.tolist()
        return std[0] if all(v == std[0] for v in std) else None

    def _factor(self, dim: int) -> Tensor | float:
        """The per-channel factor, shaped for a ``dim``-dimensional result of ``view``'s
        sample dims (a float where every channel has the same)."""
        if self._uniform is not None:
            return self._uniform
        shape = [1] * dim
        shape[self.channel_dim - (self.view.dim() - dim)] = -1
        return self.std.view(shape)

    def tensor(self) -> Tensor:
        """``(F, H, W, D)`` float32. Two plain strided passes: a copy with the token column
        innermost (long inner loops; the samples of one pixel row share a cache line and are
        read together), then, while the data is in cache, one row per token, scaled to pixel
        units on the way (an index_select / gather over the processor's rows costs 5-10x more
        per sample)."""
        v = self.view
        f, h, w = v.shape[:3]
        s = v.shape[3:]
        inner = torch.empty((f, h, *s, w), dtype=v.dtype, device=v.device)
        inner.copy_(v.permute(0, 1, *range(3, v.dim()), 2))  # token column innermost
        out = torch.empty((f, h, w, *s), dtype=torch.float32, device=v.device)
        torch.mul(inner.permute(0, 1, v.dim() - 1, *range(2, v.dim() - 1)),
                  self._factor(v.dim()), out=out)
        return out.view(f, h, w, -1)

    def windows(self, spans: Sequence[tuple[int, int, int, int, int, int]],
                n_max: int) -> Tensor:
        """``(B, n_max, D)`` float32: the tokens of the windows ``(f0, nf, h0, nh, w0, nw)``
        only, each window's ``nf * nh * nw`` rows first, then zero rows. One strided copy per
        window: reading a few windows of a large image is bound by memory latency, and a gather
        of single tokens (``index``) costs about 1.3x these copies."""
        v = self.view
        s = v.shape[3:]
        full = all(nf * nh * nw == n_max for _, nf, _, nh, _, nw in spans)
        out = (torch.empty if full else torch.zeros)(
            (len(spans), n_max, *s), dtype=torch.float32, device=v.device)
        for i, (f0, nf, h0, nh, w0, nw) in enumerate(spans):
            out[i, :nf * nh * nw].view(nf, nh, nw, *s).copy_(
                v[f0:f0 + nf, h0:h0 + nh, w0:w0 + nw])
        return out.mul_(self._factor(out.dim())).view(len(spans), n_max, -1)


def qwen_token_grid(pixel_values: Tensor, grid_thw: Sequence[int], **kwargs: Any) -> Tensor:
    """The ``(t, h / merge, w / merge, D)`` float32 token grid of one Qwen-VL item
    (:func:`qwen_token_view`, read whole)."""
    return qwen_token_view(pixel_values, grid_thw, **kwargs).tensor()


def qwen_token_view(pixel_values: Tensor, grid_thw: Sequence[int], *, patch_size: int = 14,
                    merge_size: int = 2, temporal_patch_size: int = 2, channels: int = 3,
                    samples: int = 8, sample_rows: int = 4,
                    image_std: Sequence[float] | float | None = None) -> TokenGrid:
    """The token grid of one Qwen-VL item, ``(t, h / merge, w / merge)`` tokens, not yet read.

    ``pixel_values``: this item's rows of the processor's flattened patches,
    ``(t * h * w, C * T * P * P)``; ``grid_thw``: its ``(t, h, w)`` patch grid; ``samples`` and
    ``sample_rows``: columns and rows per token (divided by ``merge`` per patch)."""
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
    v = pixel_values.reshape(t, h // m, w // m, m, m, channels, tp, p, p)[..., 0, rows, cols]
    return TokenGrid(v, _std(image_std, channels).to(pixel_values.device), 5)


def _lattice_slice(patch_size: int, samples: int) -> slice:
    """:func:`sample_offsets` as a slice (a regular lattice)."""
    off = sample_offsets(patch_size, samples)
    step = off[1] - off[0] if len(off) > 1 else 1
    return slice(off[0], off[-1] + 1, step)


def patch_token_grid(pixel_values: Tensor, **kwargs: Any) -> Tensor:
    """The ``(F, H / P, W / P, D)`` float32 token grid of LLaVA tiles (:func:`patch_token_view`,
    read whole)."""
    return patch_token_view(pixel_values, **kwargs).tensor()


def patch_token_view(pixel_values: Tensor, *, patch_size: int = 14, samples: int = 8,
                     sample_rows: int = 4,
                     image_std: Sequence[float] | float | None = None) -> TokenGrid:
    """The ``(F, H / P, W / P)`` token grid (not yet read) of ``(C, H, W)`` tiles (a single tile, or
    ``(F, C, H, W)``), one token per ``P x P`` patch (LLaVA's CLIP tower); a remainder
    narrower than a patch is ignored, as the patch embedding does."""
    x = pixel_values
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"pixel_values must be (C, H, W) or (F, C, H, W), got {tuple(x.shape)}")
    f, c, hh, ww = x.shape
    p = patch_size
    gh, gw = hh // p, ww // p
    if gh < 1 or gw < 1:
        raise ValueError(f"tiles of {hh}x{ww} pixels hold no {p}-pixel patch")
    rows = _lattice_slice(p, per_patch(sample_rows, 1, p))
    cols = _lattice_slice(p, per_patch(samples, 1, p))
    # (F, C, gh, P, gw, P) view, sampled rows and columns, tokens first: (F, gh, gw, C, r, k)
    v = x[:, :, :gh * p, :gw * p].reshape(f, c, gh, p, gw, p)[:, :, :, rows, :, cols]
    return TokenGrid(v.permute(0, 2, 4, 1, 3, 5), _std(image_std, c).to(x.device), 3)
