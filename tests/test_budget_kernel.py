"""``auto``'s compiled pass (:mod:`vllm_tokenprune.budget.kernel`, numba) gives the numpy
reader's window ranks, to float rounding, on every layout the server reads: Qwen-VL images
(normalized and raw) and videos (frame groups), an item past the first, windows overlapping
their neighbour, a window lattice, windows larger than the centring matrix (``window: 0``),
LLaVA-1.5 and LLaVA-NeXT tiles, per-channel factors that differ (every channel read) and a
one-token item; the same counts on the rendered content; it never reads past the pixels; and
``VLLM_TOKENPRUNE_AUTO_JIT=0`` turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_budget_reader import _processors
from vllm_tokenprune.budget import auto as budget_auto
from vllm_tokenprune.budget import auto_options, kernel, qwen_token_view, token_grid
from vllm_tokenprune.testing import content

pytestmark = pytest.mark.skipif(kernel.compiled() is None, reason="numba is not installed")


def _readers(grid, opts, monkeypatch, video=False):
    compiled = budget_auto.reader(grid, opts, video)
    with monkeypatch.context() as m:
        m.setattr(kernel, "compiled", lambda: None)
        plain = budget_auto.reader(grid, opts, video)
    assert compiled.compiled is not None and plain.compiled is None
    return compiled, plain


def _same(grid, opts, monkeypatch, video=False, n=None):
    compiled, plain = _readers(grid, opts, monkeypatch, video)
    a, b = compiled.estimate(grid.source, n), plain.estimate(grid.source, n)
    # the numpy path's float32 matrix products drift by up to 2e-5 of the rank on raw 0..255
    # pixels; the pass centres and sums in float64
    assert a.rank == pytest.approx(b.rank, rel=1e-4, abs=1e-6), (a, b)
    return a, b


@pytest.fixture(scope="module")
def processors():
    return _processors()


IMAGES = [("flat", 0), ("photo", "astronaut"), ("text", "16"), ("chart", "bar"), ("ui", 0)]


@pytest.mark.parametrize("kind,raw", [("qwen", False), ("qwen", True), ("llava", False),
                                      ("llava_next", False)])
def test_the_pass_counts_as_numpy_on_processor_outputs(processors, monkeypatch, kind, raw):
    from vllm_tokenprune.budget import pixel_scale

    proc = processors[kind]
    kw = {"do_rescale": False, "do_normalize": False} if raw else {}
    scale = pixel_scale(proc, **kw) if raw else None
    # sizes whose windows overlap (22 x 17 tokens at 616 x 476) and tile (21 x 28 at 784 x 588)
    for size in ((616, 476), (784, 588)):
        images = [content.render(cls, *size, var) for cls, var in IMAGES]
        out = proc(images=images, return_tensors="pt", **kw)
        for opts in (auto_options(), auto_options({"max_windows": 4}),
                     auto_options({"window": 0}), auto_options({"channel": -1})):
            for i in range(len(images)):
                a, b = _same(token_grid(out, proc, opts, i, scale=scale), opts, monkeypatch)
                assert a.num_keep == b.num_keep, (kind, size, IMAGES[i], opts)


def test_the_pass_reads_videos_items_past_the_first_and_one_token(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    pv = torch.randint(0, 256, (3 * 22 * 18 * 4 + 100 * 4, 3 * 2 * 14 * 14), generator=gen,
                       dtype=torch.uint8)
    opts = auto_options()
    for grid, video, start in (((3, 44, 36), True, 400), ((3, 44, 36), False, 0),
                               ((1, 10, 14), False, 4), ((1, 2, 2), False, 4)):
        view = qwen_token_view(pv, grid, image_std=1 / 255, start=start)
        _same(view, opts, monkeypatch, video=video)
    # values the noise floor does not remove: every window at its largest rank
    assert _same(qwen_token_view(pv, (1, 10, 14), image_std=1 / 255), opts, monkeypatch)[0].rank > 0


def test_the_pass_refuses_pixels_shorter_than_its_layout(monkeypatch):
    pv = torch.zeros(4 * 16, 3 * 2 * 14 * 14, dtype=torch.uint8)
    view = qwen_token_view(pv, (1, 8, 8), image_std=1 / 255)
    compiled, _ = _readers(view, auto_options(), monkeypatch)
    extent = compiled.compiled[0]  # one past the last value the layout reads
    assert view.source[extent - 1:].size > 0 and extent == int(view.index.max()) + 1
    compiled.estimate(view.source[:extent])
    with pytest.raises(ValueError, match="pixels hold"):
        compiled.estimate(view.source[: extent - 1])


def test_the_pass_is_off_with_the_environment_variable():
    code = ("from vllm_tokenprune.budget import kernel, auto_options; "
            "from vllm_tokenprune.budget.auto import uses_kernel; "
            "print(kernel.compiled() is None, uses_kernel(auto_options()))")
    env = {**os.environ, kernel.JIT_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]


def test_the_energy_rule_reads_with_numpy():
    opts = auto_options({"rule": "energy"})
    view = qwen_token_view(torch.zeros(64, 1176, dtype=torch.uint8), (1, 8, 8), image_std=1.0)
    assert budget_auto.reader(view, opts).compiled is None
    assert np.isfinite(budget_auto.reader(view, opts).estimate(view.source).rank)


def test_a_pass_numba_cannot_build_leaves_numpy_counting(monkeypatch):
    # numba failing to compile the pass warns and returns None (numpy counts; no request
    # fails); a cache numba cannot write compiles the pass without one
    import numba

    real = numba.njit
    warned: list[str] = []
    monkeypatch.setattr(kernel.logger, "warning", lambda msg, *a: warned.append(msg % a))

    def broken(**flags):
        def wrap(fn):
            def call(*args):
                raise numba.core.errors.TypingError("planted")
            return call
        return wrap

    monkeypatch.setattr(numba, "njit", broken)
    assert kernel._build() is None and "planted" in warned[0]

    def no_cache(**flags):
        if flags.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(**flags)

    monkeypatch.setattr(numba, "njit", no_cache)
    fn = kernel._build()
    assert fn is not None and fn(np.zeros(4, np.uint8), np.zeros(1, np.int64),
                                 np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), kernel.NO_WINDOWS,
                                 0, 0, 0, 0, 1, 1, 1, 1, 1, 1) == 0.0


def test_the_servers_count_of_video_items_is_numpys(processors, monkeypatch):
    # the counter's compiled count (no reader kept) of a Qwen-VL video output's second item:
    # windows over window_frames token steps, the item from its first row; numpy's reader of
    # the same grid gives the same rank
    from vllm_tokenprune.budget import AutoCounter

    gen = torch.Generator().manual_seed(1)
    grids = [(2, 8, 12), (4, 44, 36)]
    rows = sum(t * h * w for t, h, w in grids)
    pv = torch.randint(0, 256, (rows, 3 * 2 * 14 * 14), generator=gen, dtype=torch.uint8)
    out = {"pixel_values_videos": pv, "video_grid_thw": torch.tensor(grids)}
    opts = auto_options()
    counter = AutoCounter(processors["qwen"], opts, modality="video", scale=1 / 255)
    got = counter.count(out, 1)
    assert counter._readers == {}
    view = qwen_token_view(pv, grids[1], image_std=1 / 255, start=2 * 8 * 12,
                           channel=opts.channel, samples=opts.samples,
                           sample_rows=opts.sample_rows)
    with monkeypatch.context() as m:
        m.setattr(kernel, "compiled", lambda: None)
        want = budget_auto.reader(view, opts, True).estimate(view.source)
    assert got.rank == pytest.approx(want.rank, rel=1e-4) and got.num_keep == want.num_keep
