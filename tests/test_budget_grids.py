"""``auto``'s token grids (:mod:`vllm_tokenprune.budget.grids`) without a processor: the strided
reads give exactly the sampled pixels (against a plain per-sample reference), and the window
lattice, which reads only its windows' tokens from the pixels, gives the same rank (float32
rounding apart) as the same windows cut from the whole grid (Qwen-VL rows with a video's frames and
overlapping last windows; LLaVA-NeXT tiles); the estimator's ranks equal a per-window
eigendecomposition; one colour channel reads that channel's samples, and the mosaic (``auto``'s
default) one channel per sample row (green, red, green, blue); near-equal channel factors share
their mean; the windows are as even as they can be."""

from __future__ import annotations

import itertools
import math

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
    window_ranks,
)


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x[..., :5] = 9  # some flat pixels, so windows differ
    return x


def test_qwen_grid_holds_the_sampled_pixels():
    # a token's samples come from the merge block's diagonal patches (dy == dx): per patch
    # sample_rows / merge rows and `samples` columns within the patch
    t, h, w, m, p, tp, c = 2, 10, 18, 2, 14, 2, 3
    pv = _pixels(t * h * w, c * tp * p * p)
    rows, cols = sample_offsets(p, 2), sample_offsets(p, 4)
    ref = torch.empty(t, h // m, w // m, m, c, len(rows), len(cols))
    for ti in range(t):
        for hi in range(h // m):
            for wi in range(w // m):
                for dy in range(m):
                    row = (((ti * (h // m) + hi) * (w // m) + wi) * m + dy) * m + dy
                    for ci in range(c):
                        for ri, r in enumerate(rows):
                            for ki, k in enumerate(cols):
                                ref[ti, hi, wi, dy, ci, ri, ki] = \
                                    pv[row, ci * tp * p * p + r * p + k].float() * (1 / 255)
    std = [0.5, 0.25, 1.0]
    got = qwen_token_grid(pv, (t, h, w), image_std=1 / 255)  # 4 x 4 per token: the defaults
    assert torch.equal(got, ref.view(t, h // m, w // m, -1))
    scaled = qwen_token_grid(pv.float() / 255, (t, h, w), image_std=std)
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


def _starts(size: int, win: int) -> list[int]:
    """Window starts on one axis: every ``win`` rows, the last window ending at the edge."""
    return sorted({min(s, size - win) for s in range(0, size, win)})


def _reference_rank(grid: torch.Tensor, window: int) -> float:
    """Mean over windows of at most ``window x window`` tokens, as even as they can be (``k``
    windows of ``ceil(size / k)`` on an axis, ``k = ceil(size / window)``; the last on each axis
    ending at the edge, overlapping its neighbour) of each window's participation ratio
    ``(sum l)^2 / sum l^2`` of its centred Gram's eigenvalues, at most ``min(k - 1, D)``, per
    token, times the grid's tokens: one window at a time, float64, an eigendecomposition (the
    rule without its noise floor)."""
    f, h, w, d = grid.shape
    wh, ww = (math.ceil(n / math.ceil(n / window)) for n in (h, w))
    total, rows = 0.0, 0
    for fi in range(f):
        for h0 in _starts(h, wh):
            for w0 in _starts(w, ww):
                x = grid[fi, h0:h0 + wh, w0:w0 + ww].reshape(-1, d).double()
                rows += x.shape[0]
                x = x - x.mean(dim=0)
                lam = torch.linalg.eigvalsh(x.T @ x).clamp_min(0)
                if lam.sum() > 0:
                    pr = float(lam.sum() ** 2 / (lam**2).sum())
                    total += min(pr, max(1, min(x.shape[0] - 1, d)))
    return total * f * h * w / rows


def test_window_ranks_match_a_per_window_reference():
    # overlapping last windows on both axes, D x D and n x n Grams, a per-channel factor to
    # pixel units, one channel alone; a second image of the same shape (the estimator reuses
    # its buffers: nothing of the first may leak into it)
    pvs = [_pixels(2 * 20 * 26, 3 * 2 * 14 * 14, seed=s) for s in (1, 2)]
    for pv, opts in itertools.product(pvs, (
            {"noise_floor": 0.0, "max_windows": 0},  # n = 64 > D = 48: a D x D Gram
            {"noise_floor": 0.0, "max_windows": 0, "window": 4})):  # n = 16: n x n
        o = auto_options(opts)
        for std, channel in (([0.3, 0.2, 0.1], None), (1 / 255, 1), ([0.3, 0.2, 0.1], -2)):
            view = qwen_token_view(pv, (2, 20, 26), samples=o.samples, sample_rows=o.sample_rows,
                                   image_std=std, channel=channel)
            rank, windows, computed = window_ranks(view, o)
            assert windows == computed
            assert rank == pytest.approx(_reference_rank(view.tensor(), o.window), rel=1e-4)


def test_one_channel_is_that_channels_samples():
    pv = _pixels(4 * 6, 3 * 2 * 14 * 14)
    full = qwen_token_grid(pv, (1, 4, 6), image_std=[0.3, 0.2, 0.1])
    for c in range(3):
        one = qwen_token_grid(pv, (1, 4, 6), image_std=[0.3, 0.2, 0.1], channel=c)
        # (H, W, diagonal patch, C, rows, cols) per token: channel c of both diagonal patches
        ref = full.view(1, 2, 3, 2, 3, -1)[:, :, :, :, c].reshape(one.shape)
        assert torch.equal(one, ref)
    tiles = _pixels(2, 3, 56, 42).float()
    ref = patch_token_grid(tiles).view(2, 4, 3, 3, -1)[:, :, :, 2]
    assert torch.equal(patch_token_grid(tiles, channel=2), ref.reshape(2, 4, 3, -1))


#: The mosaic's channel of a token's sample row (R 0, G 1, B 2): green, red, green, blue.
MOSAIC_ROWS = (1, 0, 1, 2)


def test_mosaic_reads_one_channel_per_sample_row():
    std = [0.5, 0.25, 1.0]
    # Qwen-VL: the token's 4 sample rows are the diagonal patches' 2 + 2: G, R, then G, B
    pv = _pixels(2 * 6 * 8, 3 * 2 * 14 * 14)
    full = qwen_token_grid(pv, (2, 6, 8), image_std=std)  # (..., patch, C, rows, cols)
    got = qwen_token_grid(pv, (2, 6, 8), image_std=std, channel=-2)
    x = full.view(2, 3, 4, 2, 3, 2, 4)
    ref = torch.stack([x[:, :, :, dy, MOSAIC_ROWS[2 * dy + r], r]
                       for dy in range(2) for r in range(2)], dim=3)
    assert got.shape == (2, 3, 4, 16) and torch.equal(got, ref.reshape(got.shape))
    # LLaVA: one patch per token, its 4 sample rows G, R, G, B
    tiles = _pixels(2, 3, 56, 42).float()
    full = patch_token_grid(tiles, image_std=std).view(2, 4, 3, 3, 4, 4)
    ref = torch.stack([full[:, :, :, MOSAIC_ROWS[r], r] for r in range(4)], dim=3)
    assert torch.equal(patch_token_grid(tiles, image_std=std, channel=-2), ref.reshape(2, 4, 3, -1))
    # auto's default; the lazy read (per-value factors after centring) = the grid read whole
    assert auto_options().channel == -2
    mosaic = qwen_token_view(pv, (2, 6, 8), image_std=std, channel=-2)
    assert window_ranks(mosaic, auto_options())[0] == pytest.approx(
        window_ranks(mosaic.tensor(), auto_options())[0], rel=1e-5)


def test_near_equal_channel_factors_share_their_mean():
    # CLIP's per-channel std (within 10% of each other): one factor, their mean, for every
    # value; the lazy read then scales the moments, and equals the grid read whole
    clip = [0.26862954, 0.26130258, 0.27577711]
    pv = _pixels(4 * 6, 3 * 2 * 14 * 14).float() / 255
    view = qwen_token_view(pv, (1, 4, 6), image_std=clip)
    assert view.uniform == pytest.approx(sum(clip) / 3) and (view.factor == view.factor[0]).all()
    assert window_ranks(view, auto_options())[0] == pytest.approx(
        window_ranks(view.tensor(), auto_options())[0], rel=1e-5)
    assert qwen_token_view(pv, (1, 4, 6), image_std=[0.3, 0.2, 0.1]).uniform is None  # 50%
    assert qwen_token_view(pv, (1, 4, 6), image_std=[0.3, 0.2, 0.1], channel=1).uniform == \
        pytest.approx(0.2)


def test_windows_are_as_even_as_they_can_be():
    from vllm_tokenprune.budget.windows import _side
    from vllm_tokenprune.budget.windows import plan_windows as _plan

    # 21 tokens in windows of at most 8: three of 7, no overlap; 22: three of 8, the last
    # overlapping by 2; 8 or fewer: one window
    assert [_side(n, 8) for n in (21, 22, 24, 8, 5, 28, 42, 56)] == [7, 8, 8, 8, 5, 7, 7, 8]
    plan = _plan((1, 21, 28), 8, 1, 0)
    assert plan.tail == (1, 7, 7) and plan.computed == 12 and plan.rows == 21 * 28
    plan = _plan((3, 22, 9), 8, 2, 0)  # 2 frame groups (the last overlapping), 3 x 2 windows
    assert plan.tail == (2, 8, 5) and plan.computed == 2 * 3 * 2


def test_one_layout_read_from_pixels_of_several_dtypes():
    # the estimator keeps its buffers per layout and thread: pixels of another dtype with the
    # same layout (raw uint8, then float16, then float32) must not reuse the other's scratch
    pv = _pixels(4 * 6, 3 * 2 * 14 * 14)
    o = auto_options()
    for x, std in ((pv, 1 / 255), ((pv / 255).half(), 1.0), (pv.float() / 255, 1.0)):
        view = qwen_token_view(x, (1, 4, 6), image_std=std)
        assert window_ranks(view, o)[0] == pytest.approx(
            window_ranks(view.tensor(), o)[0], rel=1e-5)


def test_pixels_numpy_cannot_share_are_read_as_well():
    # the view takes a CPU tensor's memory in one call; bfloat16 (no numpy dtype) and a tensor
    # that requires grad go the long way, to the same values; a wrong shape is refused after a
    # cached layout as before it
    pv = _pixels(4 * 6, 3 * 2 * 14 * 14).float() / 255
    std = [0.5, 0.25, 1.0]
    for x in (pv.to(torch.bfloat16), pv.clone().requires_grad_()):
        got = qwen_token_grid(x, (1, 4, 6), image_std=tuple(std))
        assert torch.equal(got, qwen_token_grid(x.detach().float(), (1, 4, 6), image_std=std))
    with pytest.raises(ValueError, match=r"shape \(23, 1176\).*needs \(24, 1176\)"):
        qwen_token_view(pv[:-1], (1, 4, 6))


def test_an_item_read_in_place_from_a_whole_output():
    # a view of a whole processor output from the item's first row (Qwen-VL) or tile (LLaVA)
    # holds the same values as a view of the item's own slice; a view past the end is refused
    pv = _pixels(3 * 4 * 6 + 2 * 6 * 4, 3 * 2 * 14 * 14)
    start = 3 * 4 * 6
    whole = qwen_token_view(pv, (2, 6, 4), start=start, image_std=1 / 255)
    assert torch.equal(whole.tensor(), qwen_token_grid(pv[start:], (2, 6, 4), image_std=1 / 255))
    with pytest.raises(ValueError, match=f"rows {start + 1} on"):
        qwen_token_view(pv, (2, 6, 4), start=start + 1)
    tiles = _pixels(5, 3, 56, 42).float()
    got = patch_token_view(tiles, first=2, count=2).tensor()
    assert torch.equal(got, patch_token_grid(tiles[2:4]))
    with pytest.raises(ValueError, match="tiles 4..5 of 5"):
        patch_token_view(tiles, first=4, count=2)


def test_large_windows_are_centred_by_their_mean(monkeypatch):
    # one window of a whole 60 x 80-token grid (window 0): no 4,800 x 4,800 centring matrix,
    # the same rank as the per-window reference; a window just below the limit uses the matrix
    # (numpy's reader: the compiled pass has no matrix, tests/test_budget_kernel.py)
    from vllm_tokenprune.budget import kernel
    from vllm_tokenprune.budget.auto import CENTRING_MATRIX_MAX, _centring, reader

    monkeypatch.setattr(kernel, "compiled", lambda: None)

    pv = _pixels(120 * 160, 3 * 2 * 14 * 14)
    view = qwen_token_view(pv, (1, 120, 160), image_std=1 / 255)
    o = auto_options({"noise_floor": 0.0, "window": 0})
    assert reader(view, o).centring is None
    _centring.cache_clear()
    assert window_ranks(view, o)[0] == pytest.approx(
        _reference_rank(view.tensor(), 1000), rel=1e-4)
    assert _centring.cache_info().currsize == 0
    small = auto_options({"window": 10})  # 10 x 10 = 100 tokens <= 128
    assert CENTRING_MATRIX_MAX >= 100 and reader(view, small).centring.shape == (100, 100)
