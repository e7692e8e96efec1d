"""The API server's ``auto`` count (:func:`vllm_tokenprune.budget.auto_count`, which keeps a
reader per processor-output layout) equals the plain estimate (``estimate_keep`` of
``token_grid``) for every item of HF processor outputs: Qwen-VL (normalized and vLLM's raw
pixels), LLaVA-1.5 and LLaVA-NeXT, first call and kept reader alike; two images of one size in one
output each read their own pixels (a flat image and a text page: a reader keyed or offset wrongly
gives the other's count)."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_tokenprune.budget import auto_count, auto_options, estimate_keep, pixel_scale, token_grid
from vllm_tokenprune.budget import hf as budget_hf
from vllm_tokenprune.testing import content


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
def test_kept_readers_count_as_the_plain_estimate(processors, kind, raw):
    proc = processors[kind]
    opts = auto_options()
    kw = {"do_rescale": False, "do_normalize": False} if raw else {}
    scale = pixel_scale(proc, **kw) if raw else None
    flat, text = content.render("flat", 448, 336), content.render("text", 448, 336)
    photo = content.render("photo", 280, 392)
    out = proc(images=[flat, text, photo], return_tensors="pt", **kw)
    budget_hf._READERS.clear()
    for _ in range(2):  # first: readers made; second: the kept readers
        got = [auto_count(out, proc, opts, i, scale=scale) for i in range(3)]
        want = [estimate_keep(token_grid(out, proc, opts, i, scale=scale), None, opts)
                for i in range(3)]
        assert got == want
    assert len(budget_hf._READERS) == 3
    # the flat image on the floor, the text page well above it: each item its own pixels
    assert got[0].bound == "min" and got[1].num_keep > 3 * got[0].num_keep, got
    # a new output of the same layout reads its own pixels through the kept reader
    again = proc(images=[text, flat, photo], return_tensors="pt", **kw)
    assert [auto_count(again, proc, opts, i, scale=scale).num_keep for i in range(2)] == \
        [got[1].num_keep, got[0].num_keep]
    assert len(budget_hf._READERS) == 3


def test_readers_are_kept_per_processor_and_bounded(processors):
    # per processor object; the 64 latest used are kept (the oldest unused go first)
    opts = auto_options()
    proc = processors["llava"]
    image = content.render("text", 336, 336)
    budget_hf._READERS.clear()
    first = auto_count(proc(images=[image], return_tensors="pt"), proc, opts)
    other = _processors()["llava"]  # another processor object: its own reader
    assert auto_count(other(images=[image], return_tensors="pt"), other, opts) == first
    assert len(budget_hf._READERS) == 2
    out = proc(images=[image], return_tensors="pt")
    for n in range(70):  # 70 more layouts (another factor each), the first one used throughout
        auto_count(out, proc, opts, scale=[0.2 + n / 1000] * 3)
        auto_count(out, proc, opts)
    assert len(budget_hf._READERS) == 64
    kept = [k for k in budget_hf._READERS if k[0] == id(proc) and k[5] is None]
    assert len(kept) == 1 and next(reversed(budget_hf._READERS)) == kept[0]


def test_qwen_items_of_one_size_in_either_orientation(processors):
    # the same pixel rows, other token grids: a reader is kept per item grid, not per shape
    proc, opts = processors["qwen"], auto_options()
    a, b = content.render("text", 448, 336, "16"), content.render("chart", 336, 448, "line")
    budget_hf._READERS.clear()
    for images in ([a, b], [b, a]):
        out = proc(images=images, return_tensors="pt")
        for i in range(2):
            assert auto_count(out, proc, opts, i) == estimate_keep(
                token_grid(out, proc, opts, i), None, opts)


def test_threads_share_the_readers(processors, monkeypatch):
    # processors may run in threads: readers made, used and evicted concurrently (4 kept for 6
    # layouts) give every thread the plain estimate, and nothing raises (the race the lock
    # closes, a look-up and its move to the end around another thread's eviction, is too narrow
    # to force here: this checks the readers, not the lock)
    from concurrent.futures import ThreadPoolExecutor

    proc, opts = processors["qwen"], auto_options()
    monkeypatch.setattr(budget_hf, "_KEPT", 4)
    outs = [proc(images=[content.render("text", 224 + 28 * k, 224, "16")], return_tensors="pt")
            for k in range(6)]
    want = [estimate_keep(token_grid(o, proc, opts), None, opts) for o in outs]

    def run(i: int) -> bool:
        return all(auto_count(outs[(i + k) % 6], proc, opts) == want[(i + k) % 6]
                   for k in range(30))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(run, range(6)))
    assert len(budget_hf._READERS) <= 4


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
