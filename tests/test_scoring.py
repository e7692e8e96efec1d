"""API and validation tests for every scoring method (vllm_tokenprune.scoring)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vllm_tokenprune
from vllm_tokenprune.scoring import (
    METHOD_OPTIONS,
    get_method,
    list_methods,
    method_options,
    num_kept,
    register_method,
    select_tokens,
    select_tokens_batch,
    validate_options,
)
from vllm_tokenprune.scoring._common import buckets, hash_keys
from vllm_tokenprune.scoring.uniform import uniform_indices

METHODS = list_methods()
EXPECTED = ["cdpruner", "divprune", "lrcp", "norm", "random", "resprune", "svd_prune", "uniform"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "scorers.md"


def _feats(n: int = 96, d: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype)


def _check_indices(idx: torch.Tensor, k: int, n: int, device: torch.device) -> None:
    assert idx.dtype == torch.int64
    assert idx.device == device
    assert idx.shape == (k,)
    assert torch.unique(idx).numel() == k
    assert bool((idx[1:] > idx[:-1]).all())
    assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_list_methods_and_root_exports():
    assert METHODS == EXPECTED
    assert vllm_tokenprune.list_methods() == EXPECTED
    assert vllm_tokenprune.select_tokens is select_tokens
    assert vllm_tokenprune.select_tokens_batch is select_tokens_batch
    assert vllm_tokenprune.num_kept is num_kept
    assert vllm_tokenprune.__version__ == "0.1.0"


@pytest.mark.slow
def test_package_import_is_light():
    code = (
        "import sys, vllm_tokenprune; "
        "bad = [m for m in ('vllm', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 7, 95])
def test_basic_contract(method, k):
    x = _feats()
    text = _feats(3, 32, seed=1)
    idx = select_tokens(x, k, method, text_embeds=text, grid=(2, 6, 8))
    _check_indices(idx, k, 96, x.device)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    x = _feats(200, 48)
    text = _feats(4, 48, seed=3)
    a = select_tokens(x, 23, method, text_embeds=text)
    b = select_tokens(x.clone(), 23, method, text_embeds=text.clone())
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(method, dtype):
    x = _feats(120, 40)
    idx = select_tokens(x.to(dtype), 30, method, text_embeds=_feats(2, 40, 5).to(dtype))
    _check_indices(idx, 30, 120, x.device)
    # float32 math: the bf16 result equals the float32 result on the bf16-rounded values
    ref = select_tokens(x.to(dtype).float(), 30, method, text_embeds=_feats(2, 40, 5).to(dtype))
    assert torch.equal(idx, ref)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single(method):
    sizes = [96, 57, 96, 200, 1, 33]
    feats = [_feats(n, 24, seed=i) for i, n in enumerate(sizes)]
    ks = [10, 57, 3, 40, 1, 32]
    texts = [_feats(2, 24, seed=10 + i) if i % 2 == 0 else None for i in range(len(sizes))]
    grids = [(1, 8, 12), None, (2, 6, 8), (1, 10, 20), (1, 1, 1), None]
    batch = select_tokens_batch(feats, ks, method, text_embeds=texts, grids=grids)
    assert len(batch) == len(sizes)
    for i in range(len(sizes)):
        single = select_tokens(feats[i], ks[i], method, text_embeds=texts[i], grid=grids[i])
        _check_indices(batch[i], ks[i], sizes[i], feats[i].device)
        assert torch.equal(batch[i], single), (method, i)


@pytest.mark.parametrize("method", METHODS)
def test_batch_options_and_empty(method):
    assert select_tokens_batch([], [], method) == []
    feats = [_feats(50, 16, seed=1), _feats(70, 16, seed=2)]
    out = (
        select_tokens_batch(feats, [5, 9], method, seed=3)
        if "seed" in method_options(method)
        else select_tokens_batch(feats, [5, 9], method)
    )
    assert [t.numel() for t in out] == [5, 9]


@pytest.mark.parametrize("method", METHODS)
def test_edge_cases(method):
    # N = 1
    one = select_tokens(torch.randn(1, 8), 1, method)
    assert one.tolist() == [0]
    # num_keep = N
    x = _feats(20, 8)
    assert select_tokens(x, 20, method).tolist() == list(range(20))
    # all-identical tokens: deterministic, valid
    same = torch.ones(50, 16) * 0.3
    a = select_tokens(same, 7, method, text_embeds=torch.ones(1, 16))
    _check_indices(a, 7, 50, same.device)
    assert torch.equal(a, select_tokens(same.clone(), 7, method, text_embeds=torch.ones(1, 16)))
    # all-zero tokens
    _check_indices(select_tokens(torch.zeros(30, 8), 4, method), 4, 30, same.device)
    # rank-deficient input (rank 2 < requested rank 16, and k > rank)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(80, 2, generator=g) @ torch.randn(2, 32, generator=g)
    idx = select_tokens(low, 25, method)
    _check_indices(idx, 25, 80, low.device)
    assert torch.equal(idx, select_tokens(low.clone(), 25, method))
    # D = 1 and D larger than N
    _check_indices(select_tokens(torch.randn(40, 1), 6, method), 6, 40, same.device)
    _check_indices(select_tokens(torch.randn(10, 300), 4, method), 4, 10, same.device)


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_input(method):
    x = _feats(64, 40)
    view = x.t().contiguous().t()[:, :32]  # strided view
    assert not view.is_contiguous()
    assert torch.equal(select_tokens(view, 9, method), select_tokens(view.contiguous(), 9, method))


# ---------------------------------------------------------------- bad input -> ValueError


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise(method):
    x = _feats(30, 8)
    with pytest.raises(ValueError, match="2-D"):
        select_tokens(torch.randn(30), 3, method)
    with pytest.raises(ValueError, match="2-D"):
        select_tokens(torch.randn(2, 30, 8), 3, method)
    with pytest.raises(ValueError, match="floating"):
        select_tokens(torch.ones(30, 8, dtype=torch.int64), 3, method)
    with pytest.raises(ValueError, match="non-empty"):
        select_tokens(torch.randn(0, 8), 1, method)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_tokens(bad, 3, method)
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_tokens(bad, 3, method)
    with pytest.raises(ValueError, match="num_keep must be >= 1"):
        select_tokens(x, 0, method)
    with pytest.raises(ValueError, match="num_keep must be >= 1"):
        select_tokens(x, -2, method)
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        select_tokens(x, 31, method)
    with pytest.raises(ValueError, match="num_keep must be an integer"):
        select_tokens(x, 2.5, method)
    with pytest.raises(ValueError, match="text_embeds width"):
        select_tokens(x, 3, method, text_embeds=torch.randn(2, 9))
    nan_text = torch.randn(2, 8)
    nan_text[0, 0] = float("nan")
    with pytest.raises(ValueError, match="text_embeds.*NaN"):
        select_tokens(x, 3, method, text_embeds=nan_text)
    with pytest.raises(ValueError, match="grid"):
        select_tokens(x, 3, method, grid=(1, 5, 5))
    with pytest.raises(ValueError, match="grid"):
        select_tokens(x, 3, method, grid=(30, 1))
    with pytest.raises(ValueError, match="unknown option.*'bogus'"):
        select_tokens(x, 3, method, bogus=1)


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="unknown scoring method 'nope'.*lrcp.*svd_prune"):
        select_tokens(torch.randn(5, 4), 2, "nope")
    with pytest.raises(ValueError, match="unknown scoring method"):
        get_method("nope")


def test_batch_bad_inputs():
    a, b = _feats(10, 8), _feats(12, 8)
    with pytest.raises(ValueError, match="num_keep has 1 entries"):
        select_tokens_batch([a, b], [2])
    with pytest.raises(ValueError, match=r"features\[1\] has width 9"):
        select_tokens_batch([a, torch.randn(12, 9)], [2, 2])
    with pytest.raises(ValueError, match=r"features\[1\] contains NaN"):
        select_tokens_batch([a, b * float("nan")], [2, 2])
    with pytest.raises(ValueError, match="text_embeds has 1 entries"):
        select_tokens_batch([a, b], [2, 2], "resprune", text_embeds=[None])
    with pytest.raises(ValueError, match=r"exceeds.*N=12"):
        select_tokens_batch([a, b], [2, 13])
    with pytest.raises(ValueError, match="sequence"):
        select_tokens_batch(a, [2])


# ---------------------------------------------------------------- options


def test_validate_options_defaults_and_errors():
    full = validate_options("lrcp", {"rank": 4})
    assert full["rank"] == 4 and full["center"] is True
    assert validate_options("svd_prune")["center"] is False
    assert validate_options("resprune", {"relevance_weight": 1})["relevance_weight"] == 1.0
    with pytest.raises(ValueError, match="'bogus'.*valid options: rank"):
        validate_options("lrcp", {"bogus": 1})
    with pytest.raises(ValueError, match="'rank'.*>= 1"):
        validate_options("lrcp", {"rank": 0})
    with pytest.raises(ValueError, match="'rank'.*int"):
        validate_options("lrcp", {"rank": 2.5})
    with pytest.raises(ValueError, match="'center'.*bool"):
        validate_options("lrcp", {"center": 1})
    with pytest.raises(ValueError, match="'energy'"):
        validate_options("lrcp", {"energy": 1.5})
    assert validate_options("lrcp", {"energy": None})["energy"] is None
    with pytest.raises(ValueError, match="'relevance_weight'.*<= 1"):
        validate_options("resprune", {"relevance_weight": 1.5})
    with pytest.raises(ValueError, match="'text_pool'.*one of"):
        validate_options("resprune", {"text_pool": "min"})
    with pytest.raises(ValueError, match="'theta'.*< 1"):
        validate_options("cdpruner", {"theta": 1.0})
    with pytest.raises(ValueError, match="'seed'"):
        validate_options("random", {"seed": -1})
    with pytest.raises(ValueError, match="unknown scoring method"):
        validate_options("nope", {})
    with pytest.raises(ValueError, match="unknown option"):
        validate_options("norm", {"rank": 3})


@pytest.mark.parametrize("method", METHODS)
def test_every_option_documented(method):
    cls = METHOD_OPTIONS[method]
    assert dataclasses.is_dataclass(cls) and cls.__doc__
    docs = DOCS.read_text() if DOCS.exists() else ""
    for name, info in method_options(method).items():
        assert info.doc, (method, name)
        assert getattr(cls(), name) == info.default
        assert f"`{name}`" in docs, f"docs/scorers.md does not document {method}.{name}"
    assert f"`{method}`" in docs
    assert validate_options(method) == {k: v.default for k, v in method_options(method).items()}


def test_method_options_mapping():
    assert sorted(METHOD_OPTIONS) == METHODS
    assert len(METHOD_OPTIONS) == len(METHODS)
    assert method_options("lrcp")["energy"].type == "float | None"


def test_register_custom_method():
    from vllm_tokenprune.scoring import _registry
    from vllm_tokenprune.scoring._common import select_top

    @register_method("test_last")
    def last(batch, opts):
        scores = torch.arange(max(batch.sizes), dtype=torch.float32).expand(batch.size, -1)
        return select_top(scores, batch.mask(), batch.num_keep)

    try:
        assert "test_last" in list_methods()
        assert select_tokens(torch.randn(10, 3), 3, "test_last").tolist() == [7, 8, 9]
        with pytest.raises(ValueError, match="already registered"):
            register_method("test_last")(lambda b, o: [])
        with pytest.raises(ValueError, match="unknown option"):
            select_tokens(torch.randn(10, 3), 3, "test_last", rank=2)
    finally:
        _registry._REGISTRY.pop("test_last")


# ---------------------------------------------------------------- num_kept


def test_num_kept():
    assert num_kept(576, 0.0) == 576
    assert num_kept(576, 0.75) == 144
    assert num_kept(576, 0.889) == 64
    assert num_kept(2880, 0.944) == 161
    assert num_kept(10, 0.99) == 1
    assert num_kept(10, 0.99, min_keep=4) == 4
    assert num_kept(3, 0.5, min_keep=8) == 3  # capped at N
    assert num_kept(0, 0.5) == 0
    assert num_kept(5, 0.5) == round(2.5) == 2  # Python rounding (half to even)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="prune_ratio"):
            num_kept(100, bad)
    with pytest.raises(ValueError, match="num_tokens"):
        num_kept(-1, 0.5)
    with pytest.raises(ValueError, match="min_keep"):
        num_kept(10, 0.5, min_keep=-1)


# ---------------------------------------------------------------- method-specific behaviour


def test_random_seeded_nested_and_device_independent_keys():
    x = _feats(300, 8)
    a = select_tokens(x, 40, "random", seed=1)
    assert torch.equal(a, select_tokens(x * 5, 40, "random", seed=1))  # ignores values
    assert not torch.equal(a, select_tokens(x, 40, "random", seed=2))
    small = select_tokens(x, 20, "random", seed=1)
    assert set(small.tolist()) <= set(a.tolist())  # nested budgets
    keys = hash_keys(1000, 7, torch.device("cpu"))
    assert keys.unique().numel() > 995  # practically collision-free
    assert abs(float(keys.double().mean()) / 2**32 - 0.5) < 0.03


def test_uniform_layout():
    # 1-D: even stride
    assert uniform_indices(10, 5) == [1, 3, 5, 7, 9]
    # 2-D: a 4x4 lattice on a 16x16 grid
    idx = uniform_indices(256, 16, (1, 16, 16))
    rows = sorted({i // 16 for i in idx})
    cols = sorted({i % 16 for i in idx})
    assert rows == [2, 6, 10, 14] and cols == [2, 6, 10, 14]
    # video: per-frame budgets differ by at most one, layout even within frames
    t, h, w, k = 5, 12, 20, 37
    idx = uniform_indices(t * h * w, k, (t, h, w))
    per_frame = [sum(1 for i in idx if i // (h * w) == f) for f in range(t)]
    assert sum(per_frame) == k and max(per_frame) - min(per_frame) <= 1
    # fewer tokens than frames: the kept frames are spread in time
    frames = sorted({i // (h * w) for i in uniform_indices(t * h * w, 2, (t, h, w))})
    assert frames in ([1, 4], [2, 4], [1, 3])
    # every (grid, k) is exact and unique
    for grid in [(1, 1, 9), (3, 2, 7), (2, 24, 24), (4, 5, 3)]:
        n = math.prod(grid)
        for k in range(1, n + 1):
            got = uniform_indices(n, k, grid)
            assert len(got) == k == len(set(got)) and got == sorted(got)
            assert 0 <= got[0] and got[-1] < n


def test_buckets_group_similar_sizes():
    assert buckets([5, 5, 5]) == [[2, 1, 0]]
    groups = buckets([16384, 576, 600, 16000, 590])
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2, 4]]


def test_lrcp_rank_energy_and_subsample_options():
    x = _feats(300, 32)
    for opts in (
        {"rank": 1},
        {"energy": 0.5},
        {"energy": 1.0, "max_rank": 40},
        {"subsample_above": 0, "subsample": 0.3},
        {"power_iters": 0},
        {"center": False},
        {"oversample": 0, "rank": 32},
    ):
        _check_indices(select_tokens(x, 30, "lrcp", **opts), 30, 300, x.device)
    # rank >= D: the subspace is everything, all residuals vanish -> lowest indices
    assert select_tokens(x, 5, "lrcp", rank=32).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_same_device_and_no_sync(method):
    from vllm_tokenprune.scoring._common import Batch
    from vllm_tokenprune.scoring._registry import make_options

    x = _feats(300, 64).cuda().to(torch.bfloat16)
    text = _feats(3, 64, 1).cuda()
    idx = select_tokens(x, 30, method, text_embeds=text)
    assert idx.device == x.device
    _check_indices(idx, 30, 300, x.device)
    # the scorer body (validation excluded) must not synchronise with the host; the subspace
    # methods may sync inside torch.linalg.eigh (it checks the solver's info flag), once per call
    batch = Batch([x, x[:200]], [30, 20], [text, None], [None, None])
    opts = make_options(method, {})
    get_method(method).fn(batch, opts)  # warm-up (caches, pinned memory)
    torch.cuda.synchronize()
    allowed = 2 if method in ("lrcp", "svd_prune") else 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_method(method).fn(batch, opts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= allowed, [str(w.message) for w in syncs]


def test_greedy_methods_are_the_sequential_ones():
    """``token_prune.max_greedy_keep`` bounds exactly the methods with one step per kept token."""
    from vllm_tokenprune.scoring import get_method

    assert {m for m in list_methods() if get_method(m).greedy} == {
        "resprune", "divprune", "cdpruner"}
