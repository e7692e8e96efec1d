"""The API server's ``auto`` count (:class:`vllm_tokenprune.budget.AutoCounter`, which keeps a
reader per processor-output layout; ``auto_count`` keeps a counter per processor) equals the
plain estimate (``estimate_keep`` of ``token_grid``) for every item of HF processor outputs:
Qwen-VL (normalized and vLLM's raw pixels), LLaVA-1.5 and LLaVA-NeXT, first call and kept reader
alike; two images of one size in one output each read their own pixels (a flat image and a text
page: a reader keyed or offset wrongly gives the other's count). Qwen-VL's gather offsets, made
from its kept packed index, are the strided ones; an image of a new size makes none."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_tokenprune.budget import (
    AutoCounter,
    auto_count,
    auto_options,
    estimate_keep,
    kernel,
    pixel_scale,
    qwen_token_view,
    token_grid,
)
from vllm_tokenprune.budget import hf as budget_hf
from vllm_tokenprune.testing import content


@pytest.fixture(params=["numpy", "compiled"])
def path(request, monkeypatch):
    """Each test on both readers: numpy's gather and matrix products, and the compiled pass
    (:mod:`vllm_tokenprune.budget.kernel`, where numba is installed)."""
    if request.param == "compiled" and kernel.compiled() is None:
        pytest.skip("numba is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(kernel, "compiled", lambda: None)
    # auto_count's counters keep readers of one path: none from another test
    monkeypatch.setattr(budget_hf, "_COUNTERS", type(budget_hf._COUNTERS)())
    return request.param


@pytest.fixture
def numpy_path(monkeypatch):
    monkeypatch.setattr(kernel, "compiled", lambda: None)
    monkeypatch.setattr(budget_hf, "_COUNTERS", type(budget_hf._COUNTERS)())


def _processors() -> dict[str, Any]:
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, Qwen2VLImageProcessor

    return {
        "qwen": Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 3136, "longest_edge": 1003520}),
        "llava": CLIPImageProcessor(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336}),
        "llava_next": LlavaNextImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]]),
    }


@pytest.fixture(scope="module")
def processors() -> dict[str, Any]:
    return _processors()


@pytest.mark.parametrize("kind,raw", [("qwen", False), ("qwen", True), ("llava", False),
                                      ("llava_next", False)])
def test_kept_readers_count_as_the_plain_estimate(processors, path, kind, raw):
    proc = processors[kind]
    opts = auto_options()
    kw = {"do_rescale": False, "do_normalize": False} if raw else {}
    scale = pixel_scale(proc, **kw) if raw else None
    flat, text = content.render("flat", 448, 336), content.render("text", 448, 336)
    photo = content.render("photo", 280, 392)
    out = proc(images=[flat, text, photo], return_tensors="pt", **kw)
    counter = AutoCounter(proc, opts, scale=scale)
    for _ in range(2):  # first: readers made; second: the kept readers
        got = [counter.count(out, i) for i in range(3)]
        want = [estimate_keep(token_grid(out, proc, opts, i, scale=scale), None, opts)
                for i in range(3)]
        assert got == want
        assert [auto_count(out, proc, opts, i, scale=scale) for i in range(3)] == want
    # a reader per layout; Qwen-VL through the compiled pass keeps none (its layout is a few
    # integers, computed per count)
    kept = 0 if path == "compiled" and kind == "qwen" else 3
    assert len(counter._readers) == kept
    # the flat image on the floor, the text page well above it: each item its own pixels
    assert got[0].bound == "min" and got[1].num_keep > 3 * got[0].num_keep, got
    # a new output of the same layout reads its own pixels through the kept reader
    again = proc(images=[text, flat, photo], return_tensors="pt", **kw)
    assert [counter.count(again, i).num_keep for i in range(2)] == \
        [got[1].num_keep, got[0].num_keep]
    assert len(counter._readers) == kept


def test_packed_offsets_are_the_strided_offsets():
    # a packed grid's gather offsets, reordered from the kept token index, are the offsets
    # made from its strides: windows overlapping on both axes or tiling them, a video's frame
    # groups (the last overlapping), an item past the first (base), one window, and a
    # one-token item past the first (its window order is the kept index's own: not written)
    import numpy as np

    from vllm_tokenprune.budget.grids import packed_index
    from vllm_tokenprune.budget.windows import plan_windows

    pv = torch.zeros(3 * 22 * 18 * 4 + 100 * 4, 3 * 2 * 14 * 14, dtype=torch.uint8)
    for grid, window, frames, start in (((1, 44, 36), 8, 1, 0), ((1, 42, 56), 8, 1, 0),
                                        ((3, 44, 36), 8, 2, 400), ((1, 10, 14), 0, 1, 4),
                                        ((1, 2, 2), 8, 1, 4)):
        view = qwen_token_view(pv, grid, image_std=1 / 255, start=start)
        f, h, w, _ = view.shape
        plan = plan_windows((f, h, w), window, frames, 0)
        rows = packed_index(view.strides[2], view.offsets.tobytes()).rows(f * h * w)
        assert np.array_equal(plan.packed_offsets(rows, view.base), plan.offsets(view)), grid


def test_a_qwen_image_of_a_new_size_makes_no_strided_offsets(processors, monkeypatch,
                                                            numpy_path):
    # the server's count of a Qwen-VL image of a size not met before reads through the kept
    # packed index (docs/budgets.md, "Cost"), the same count as the plain estimate; LLaVA's
    # tiles, and a window lattice, need the strided offsets
    from vllm_tokenprune.budget.windows import Plan

    made = []
    strided = Plan.offsets
    monkeypatch.setattr(Plan, "offsets", lambda self, grid: made.append(1) or strided(self, grid))
    proc, opts = processors["qwen"], auto_options()
    out = proc(images=[content.render("text", 476, 364, "16")], return_tensors="pt")
    assert AutoCounter(proc, opts).count(out) == estimate_keep(
        token_grid(out, proc, opts), None, opts)
    assert made == []
    lattice = auto_options({"max_windows": 4})
    AutoCounter(proc, lattice).count(out)
    assert made == [1]
    llava = processors["llava"]
    AutoCounter(llava, opts).count(llava(images=[content.render("text", 336, 336)],
                                         return_tensors="pt"))
    assert made == [1, 1]


def test_counters_are_kept_per_processor_and_readers_bounded(processors, path, monkeypatch):
    # auto_count keeps a counter per processor object; a counter keeps the _KEPT latest
    # readers made
    opts = auto_options()
    proc = processors["llava"]
    image = content.render("text", 336, 336)
    first = auto_count(proc(images=[image], return_tensors="pt"), proc, opts)
    other = _processors()["llava"]  # another processor object: its own counter
    assert auto_count(other(images=[image], return_tensors="pt"), other, opts) == first
    kept = [c for c in budget_hf._COUNTERS.values() if c.processor in (proc, other)]
    assert len(kept) == 2
    monkeypatch.setattr(budget_hf, "_KEPT", 4)
    qwen = processors["qwen"]
    counter = AutoCounter(qwen, opts)
    outs = [qwen(images=[content.render("text", 224 + 28 * k, 224, "16")], return_tensors="pt")
            for k in range(6)]
    for o in outs:
        counter.count(o)
    assert len(counter._readers) == (0 if path == "compiled" else 4)
    lattice = AutoCounter(qwen, auto_options({"max_windows": 1}))  # a lattice: readers kept
    for o in outs:
        lattice.count(o)
    assert len(lattice._readers) == 4
    assert counter.count(outs[0]) == estimate_keep(token_grid(outs[0], qwen, opts), None, opts)


def test_qwen_items_of_one_size_in_either_orientation(processors, path):
    # the same pixel rows, other token grids: a reader is kept per item grid, not per shape
    proc, opts = processors["qwen"], auto_options()
    a, b = content.render("text", 448, 336, "16"), content.render("chart", 336, 448, "line")
    counter = AutoCounter(proc, opts)
    for images in ([a, b], [b, a]):
        out = proc(images=images, return_tensors="pt")
        for i in range(2):
            assert counter.count(out, i) == estimate_keep(
                token_grid(out, proc, opts, i), None, opts)


def test_threads_share_the_readers(processors, path, monkeypatch):
    # processors may run in threads: readers made, used and evicted concurrently (4 kept for 6
    # layouts) give every thread the plain estimate, and nothing raises
    from concurrent.futures import ThreadPoolExecutor

    proc, opts = processors["qwen"], auto_options()
    monkeypatch.setattr(budget_hf, "_KEPT", 4)
    counter = AutoCounter(proc, opts)
    outs = [proc(images=[content.render("text", 224 + 28 * k, 224, "16")], return_tensors="pt")
            for k in range(6)]
    want = [estimate_keep(token_grid(o, proc, opts), None, opts) for o in outs]

    def run(i: int) -> bool:
        return all(counter.count(outs[(i + k) % 6]) == want[(i + k) % 6] for k in range(30))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(run, range(6)))
    assert len(counter._readers) <= 4


def test_the_compiled_pass_makes_no_offsets(processors, monkeypatch):
    # with the compiled pass a new image size makes no gather offsets at all (strided or
    # packed), Qwen-VL, a lattice and LLaVA alike: its reader holds the layout's strides
    from vllm_tokenprune.budget.windows import Plan

    if kernel.compiled() is None:
        pytest.skip("numba is not installed")
    made = []
    for name in ("offsets", "packed_offsets"):
        monkeypatch.setattr(Plan, name, lambda *a, **k: made.append(1))
    proc = processors["qwen"]
    out = proc(images=[content.render("text", 476, 364, "16")], return_tensors="pt")
    for opts in (auto_options(), auto_options({"max_windows": 4})):
        counter = AutoCounter(proc, opts)
        assert counter.count(out).num_keep > 0 and counter._qwen[-1] is None  # no packed index
    llava = processors["llava"]
    AutoCounter(llava, auto_options()).count(llava(images=[content.render("text", 336, 336)],
                                                   return_tensors="pt"))
    assert made == []


def test_options_hash_as_their_values_even_unpickled():
    # the options' hash is kept (every image's reader key holds them); options pickled in
    # another process (another str hash seed) are hashed again here, so equal options find the
    # same reader
    import os
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys; from vllm_tokenprune.budget.auto import auto_options; "
            "sys.stdout.buffer.write(pickle.dumps(auto_options({'rule': 'energy'})))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    blob = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          check=True).stdout
    theirs, ours = pickle.loads(blob), auto_options({"rule": "energy"})
    assert theirs == ours and hash(theirs) == hash(ours) and {ours: 1}[theirs] == 1
