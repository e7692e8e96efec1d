"""``auto``'s token grids (:mod:`vllm_tokenprune.budget.grids`) without a processor: the strided
reads give exactly the sampled pixels (against a plain per-sample reference), and the window
lattice, which reads only its windows' tokens from the pixels, gives the same rank (float32 rounding apart) as
the same windows cut from the whole grid (Qwen-VL rows with a video's frames and remainder windows;
LLaVA-NeXT tiles)."""

from __future__ import annotations

import pytest
import torch

from vllm_tokenprune.budget import (
    auto_options,
    estimate_keep,
    patch_token_grid,
    patch_token_view,
    qwen_token_grid,
    qwen_token_view,
    sample_offsets,
)


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x[..., :5] = 9  # some flat pixels, so windows differ
    return x


def test_qwen_grid_holds_the_sampled_pixels():
    t, h, w, m, p, tp, c = 2, 10, 18, 2, 14, 2, 3
    pv = _pixels(t * h * w, c * tp * p * p)
    rows, cols = sample_offsets(p, 2), sample_offsets(p, 4)
    ref = torch.empty(t, h // m, w // m, m, m, c, len(rows), len(cols))
    for ti in range(t):
        for hi in range(h // m):
            for wi in range(w // m):
                for dy in range(m):
                    for dx in range(m):
                        row = (((ti * (h // m) + hi) * (w // m) + wi) * m + dy) * m + dx
                        for ci in range(c):
                            for ri, r in enumerate(rows):
                                for ki, k in enumerate(cols):
                                    ref[ti, hi, wi, dy, dx, ci, ri, ki] = \
                                        pv[row, ci * tp * p * p + r * p + k].float() * (1 / 255)
    std = [0.5, 0.25, 1.0]
    got = qwen_token_grid(pv, (t, h, w), samples=8, image_std=1 / 255)
    assert torch.equal(got, ref.view(t, h // m, w // m, -1))
    scaled = qwen_token_grid(pv.float() / 255, (t, h, w), samples=8, image_std=std)
    assert torch.allclose(scaled, (ref * torch.tensor(std).view(c, 1, 1)).view(scaled.shape))


def test_patch_grid_holds_the_sampled_pixels():
    f, c, p = 3, 3, 14
    tiles = _pixels(f, c, 5 * p + 3, 4 * p + 5).float()  # remainders narrower than a patch
    rows, cols = sample_offsets(p, 4), sample_offsets(p, 7)
    got = patch_token_grid(tiles, patch_size=p, samples=7, sample_rows=4)
    assert got.shape == (f, 5, 4, c * len(rows) * len(cols))
    for fi, hi, wi in [(0, 0, 0), (1, 4, 3), (2, 2, 1)]:
        ref = torch.stack([tiles[fi, ci, hi * p + r, wi * p + k] for ci in range(c)
                           for r in rows for k in cols])
        assert torch.equal(got[fi, hi, wi], ref)


def test_lattice_reads_only_its_windows_and_counts_as_the_whole_grid():
    pv = _pixels(4 * 20 * 36, 3 * 2 * 14 * 14)  # 4 frames of 10 x 18 tokens: remainder windows
    view = qwen_token_view(pv, (4, 20, 36), image_std=1 / 255)
    tiles = patch_token_view(_pixels(5, 3, 336, 336).float() / 255, image_std=[0.3, 0.2, 0.1])
    for grid, video in ((view, True), (view, False), (tiles, False)):
        for cap in (2, 3, 5):
            opts = auto_options({"max_windows": cap})
            lazy = estimate_keep(grid, None, opts, video=video)
            whole = estimate_keep(grid.tensor(), None, opts, video=video)
            # the lazy read scales to pixel units after centring, the whole grid before: the
            # same windows, float32 rounding apart
            assert lazy.rank == pytest.approx(whole.rank, rel=1e-5) and lazy.rank > 0
            assert lazy.num_keep == whole.num_keep
