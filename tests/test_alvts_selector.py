"""ALVTS selector (pure torch): factors, importance, blocks, syncs, consistency, routing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vllm_tokenprune import num_kept
from vllm_tokenprune.alvts import (
    AlvtsOptions,
    AlvtsRouter,
    alvts_options,
    auto_rank,
    combine,
    importance,
    is_layerwise,
    layer_factors,
    num_processed,
    query_rows,
    split_tokens,
    top_tokens,
)
from vllm_tokenprune.alvts import selector as sel

H, G, DH, D = 4, 2, 16, 64


def _weights(seed: int = 0, heads: int = H, kv: int = G) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wq": torch.randn(heads * DH, D, generator=g),
        "wk": torch.randn(kv * DH, D, generator=g),
        "bq": torch.randn(heads * DH, generator=g),
        "bk": torch.randn(kv * DH, generator=g),
        "gamma": torch.rand(D, generator=g) + 0.5,
    }


def _hidden(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))


def _exact(h: torch.Tensor, w: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The layer's real attention (no RoPE, no mask, softmax over the item) that each token
    receives from the query ``rows``, summed over heads, normalised."""
    n, heads, kv = h.shape[0], w["wq"].shape[0] // DH, w["wk"].shape[0] // DH
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w["gamma"]
    q = (x @ w["wq"].T + w["bq"]).view(n, heads, DH).transpose(0, 1)[:, rows]
    k = (x @ w["wk"].T + w["bk"]).view(n, kv, DH).transpose(0, 1)
    logits = q @ k.repeat_interleave(heads // kv, 0).transpose(1, 2) / DH**0.5
    rec = logits.softmax(-1).sum((0, 1))
    return rec / rec.sum()


def _factors(w: dict[str, torch.Tensor], rank: int, **kw: Any):
    heads, kv = w["wq"].shape[0] // DH, w["wk"].shape[0] // DH
    return layer_factors(w["wq"], w["wk"], num_heads=heads, num_kv_heads=kv, rank=rank,
                         q_bias=w["bq"], norm_weight=w["gamma"], eps=1e-6, **kw)


@pytest.mark.parametrize("queries", [None, 5, 1])
def test_full_rank_equals_exact_attention_from_the_query_rows(queries: int | None) -> None:
    """GQA, query and key biases, gamma, scale: exact at rank = head_dim, for every query set."""
    w = _weights()
    h = _hidden(23, 1)
    got = importance(h, _factors(w, DH), queries)
    rows = query_rows(23, queries)
    torch.testing.assert_close(got, _exact(h, w, rows), atol=1e-6, rtol=1e-4)
    assert got.dtype == torch.float32 and abs(float(got.sum()) - 1.0) < 1e-5


def test_query_rows_are_strided_segment_centres() -> None:
    assert query_rows(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert query_rows(588, 64).tolist() == [(2 * i + 1) * 588 // 128 for i in range(64)]
    rows = query_rows(16384, 64)
    assert torch.equal(rows, rows.unique()) and int(rows[0]) == 128 and int(rows[-1]) == 16256
    assert query_rows(7, 64).tolist() == list(range(7)) == query_rows(7, None).tolist()
    with pytest.raises(ValueError, match="num_queries"):
        query_rows(10, 0)


def test_one_head_per_group_is_the_best_rank_r_approximation() -> None:
    """Without a query bias and one head per KV group, each head's factors are the truncated
    SVD of its (gamma-folded, scaled) ``Wq_h^T Wk_h``."""
    w = _weights(3, heads=4, kv=4)
    f = layer_factors(w["wq"], w["wk"], num_heads=4, num_kv_heads=4, rank=5,
                      norm_weight=w["gamma"])
    assert f.rank == 5 and f.query.shape == (D, 4 * 5) and f.key.shape == (D, 4 * 5)
    wq = (w["wq"].double() * w["gamma"].double()).view(4, DH, D)
    wk = (w["wk"].double() * w["gamma"].double()).view(4, DH, D)
    for h in range(4):
        u, s, vh = torch.linalg.svd(wq[h].T @ wk[h] / DH**0.5)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        torch.testing.assert_close(f.head_logit_matrix(h), best, atol=1e-4 * float(s[0]),
                                   rtol=0)


def test_group_subspace_is_optimal_for_the_group_and_improves_with_rank() -> None:
    """The key subspace shared by a GQA group's heads minimises the group's summed squared
    error of ``Wq_h^T Wk_g / sqrt(d)`` among rank-r subspaces of the key space (tried: random
    ones and the best one of a single head); the error falls with the rank, to 0 at d."""
    w = _weights(4)
    wq = (w["wq"].double() * w["gamma"].double()).view(H, DH, D)
    wk = (w["wk"].double() * w["gamma"].double()).view(G, DH, D)
    qk, rk = torch.linalg.qr(wk.transpose(1, 2))  # wk_g^T = qk_g rk_g
    grp = H // G

    def error_of(head_matrix: Any) -> float:
        return sum(float((wq[h].T @ wk[h // grp] / DH**0.5 - head_matrix(h)).pow(2).sum())
                   for h in range(H))

    def with_subspace(ps: list[torch.Tensor]) -> Any:
        return lambda h: (wq[h].T @ rk[h // grp].T @ ps[h // grp] @ ps[h // grp].T
                          @ qk[h // grp].T) / DH**0.5

    def factors(rank: int) -> Any:
        return layer_factors(w["wq"], w["wk"], num_heads=H, num_kv_heads=G, rank=rank,
                             norm_weight=w["gamma"])

    errors = [error_of(factors(r).head_logit_matrix) for r in (2, 4, 8, DH)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9 * errors[0]
    best = errors[1]  # rank 4
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        ps = [torch.linalg.qr(torch.randn(DH, 4, generator=g, dtype=torch.float64))[0]
              for _ in range(G)]
        assert best < error_of(with_subspace(ps))
    # each group's first head's own best subspace (its truncated SVD) is worse for the group
    ps = [torch.linalg.svd(rk[g_] @ wq[g_ * grp])[0][:, :4] for g_ in range(G)]
    assert best < error_of(with_subspace(ps))
    torch.testing.assert_close(
        torch.tensor(best), torch.tensor(error_of(with_subspace(
            [torch.linalg.eigh(sum(rk[g_] @ wq[h] @ wq[h].T @ rk[g_].T
                                   for h in range(g_ * grp, (g_ + 1) * grp)))[1][:, -4:]
             for g_ in range(G)]))), rtol=1e-6, atol=0)


def test_rank_is_capped_automatic_by_default_dtype_kept_and_bad_shapes_refused() -> None:
    w = _weights()
    assert _factors(w, 1000).rank == DH
    assert AlvtsOptions().rank is None and _factors(w, None).rank == auto_rank(D, G, DH) == 4
    assert [auto_rank(*dims) for dims in [(1024, 4, 64), (3584, 4, 128), (4096, 32, 128),
                                          (128, 2, 32), (64, 16, 4)]] == [32, 112, 16, 8, 1]
    bf = {k: v.to(torch.bfloat16) for k, v in w.items()}
    fb = _factors(bf, 8)
    assert fb.query.dtype == fb.key.dtype == torch.bfloat16
    assert fb.query_bias.dtype == torch.float32  # added to the float32 query rows
    assert _factors(w, 8, dtype=torch.float16).key.dtype == torch.float16
    with pytest.raises(ValueError, match="num_kv_heads"):
        layer_factors(w["wq"], w["wk"], num_heads=4, num_kv_heads=3, rank=4)
    with pytest.raises(ValueError, match="k_weight"):
        layer_factors(w["wq"], w["wk"][:-1], num_heads=H, num_kv_heads=G, rank=4)
    with pytest.raises(ValueError, match="rank"):
        layer_factors(w["wq"], w["wk"], num_heads=H, num_kv_heads=G, rank=0)
    with pytest.raises(ValueError, match="hidden"):
        importance(torch.randn(3, D + 1), _factors(w, 4))


def test_bf16_projections_float32_scores_close_to_float32() -> None:
    """Weights of a trained model's scale (logits of a few units): bf16 projections, float32
    scores, close to the float32 selector."""
    w = _weights(5)
    w["wq"], w["wk"] = w["wq"] * 2 * D**-0.5, w["wk"] * 2 * D**-0.5
    h = _hidden(300, 6)
    ref = importance(h, _factors(w, 8), 32)
    got = importance(h.to(torch.bfloat16), _factors({k: v.to(torch.bfloat16)
                                                     for k, v in w.items()}, 8), 32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.1, atol=1e-4)
    k = 100
    assert len(set(top_tokens(got, k).tolist()) & set(top_tokens(ref, k).tolist())) >= 0.9 * k


class _Recorder(TorchFunctionMode):
    """Records the largest bmm output and every call that makes a host wait for the device:
    ``.item()``, ``.tolist()``, tensor truth values and conversions, ``nonzero``, boolean-mask
    indexing, copies to the host."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
             "argwhere", "masked_select", "unique", "numpy", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.max_bmm = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.syncs.append(name)
        if name in ("__getitem__", "__setitem__", "index_put_") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool
                for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.syncs.append(f"{name}[bool mask]")
        out = func(*args, **kwargs)
        if name == "bmm":
            self.max_bmm = max(self.max_bmm, out.numel())
        return out


def test_recorder_sees_syncs() -> None:
    """The recorder used below catches what it claims to (a planted sync is seen)."""
    x = torch.rand(6)
    with _Recorder() as rec:
        _ = x[x > 0.5]
        _ = x.nonzero()
        _ = bool(x[0] > 2)
        _ = int(x.argmax())
    assert rec.syncs == ["__getitem__[bool mask]", "nonzero", "__bool__", "__int__"]


def test_routing_makes_no_host_sync_and_bounds_its_blocks(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    w0, w1 = _weights(0), _weights(1)
    router = AlvtsRouter({2: _factors(w0, 8), 3: _factors(w1, 8)},
                         AlvtsOptions(consistency=0.25, queries=20))
    h = _hidden(500, 2)
    state = router.new_state()
    monkeypatch.setattr(sel, "_BLOCK_ELEMS", 3000)
    with _Recorder() as rec:
        router.route(2, h, 100, state)
        router.route_split(3, h, 100, state)
    assert rec.syncs == []
    assert 0 < rec.max_bmm <= 3000  # 6 whole softmax rows of 500 keys per block
    monkeypatch.setattr(sel, "_BLOCK_ELEMS", 100)  # below one row: one row at a time
    with _Recorder() as rec:
        importance(h, router.factors[2], 20)
    assert rec.max_bmm == 500 and rec.syncs == []


@pytest.mark.parametrize("block", [1 << 22, 500 * 40, 500 * 7, 1])
def test_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Whole groups per block, a split group (a step that does not divide the rows), one row
    per block: the same importance (rounding) and the same routing."""
    w = _weights()
    h = _hidden(500, 3)
    f = _factors(w, 6)
    whole = importance(h, f, 20)
    monkeypatch.setattr(sel, "_BLOCK_ELEMS", block)
    got = importance(h, f, 20)
    torch.testing.assert_close(got, whole, atol=1e-8, rtol=1e-5)
    assert torch.equal(top_tokens(got, 123), top_tokens(whole, 123))


def test_deterministic_and_only_the_item_matters() -> None:
    f = _factors(_weights(), 6)
    h = _hidden(257, 4)
    a = importance(h, f, 64)
    assert torch.equal(a, importance(h.clone(), f, 64))
    # the item's rows alone decide: the same rows inside a larger batch give the same scores
    batch = torch.cat([_hidden(40, 7), h, _hidden(13, 8)])
    assert torch.equal(importance(batch[40:297], f, 64), a)


def test_all_queries_is_permutation_equivariant() -> None:
    f = _factors(_weights(), 6)
    h = _hidden(17, 4)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(importance(h[perm], f), importance(h, f)[perm], atol=1e-7,
                               rtol=1e-5)


def test_top_tokens_and_split_ties_lowest_index_ascending() -> None:
    s = torch.tensor([0.1, 0.3, 0.3, 0.05, 0.3])
    assert top_tokens(s, 2).tolist() == [1, 2]
    assert top_tokens(s, 4).tolist() == [0, 1, 2, 4]
    assert top_tokens(s, 5).tolist() == [0, 1, 2, 3, 4]
    assert top_tokens(s, 0).tolist() == []
    assert top_tokens(s, 2).dtype == torch.int64
    through, skipped = split_tokens(s, 2)
    assert through.tolist() == [1, 2] and skipped.tolist() == [0, 3, 4]
    assert skipped.dtype == torch.int64
    ties = torch.zeros(1000)
    assert top_tokens(ties, 10).tolist() == list(range(10))
    with pytest.raises(ValueError):
        top_tokens(s, 6)
    with pytest.raises(ValueError):
        split_tokens(s, -1)


def test_consistency_blend_and_router_state() -> None:
    a, b = torch.tensor([0.6, 0.4]), torch.tensor([0.0, 1.0])
    assert combine(a, None, 0.5) is a
    torch.testing.assert_close(combine(a, b, 0.25), 0.75 * a + 0.25 * b)
    w0, w1 = _weights(0), _weights(1)
    opts = AlvtsOptions(consistency=0.5, queries=7)
    router = AlvtsRouter({3: _factors(w1, 4), 2: _factors(w0, 4)}, opts)
    assert router.routed_layers == [2, 3]
    h = _hidden(30, 6)
    state = router.new_state()
    idx2 = router.route(2, h, 10, state)
    s2 = state["score"]
    through, skipped = router.route_split(3, h, 10, state)
    expect = 0.5 * importance(h, router.factors[3], 7) + 0.5 * s2
    torch.testing.assert_close(state["score"], expect)
    assert through.tolist() == top_tokens(expect, 10).tolist()
    assert sorted(through.tolist() + skipped.tolist()) == list(range(30))
    assert idx2.tolist() == top_tokens(importance(h, router.factors[2], 7), 10).tolist()
    again = router.new_state()
    assert router.route(2, h.clone(), 10, again).tolist() == idx2.tolist()


def test_keep_count_rule_and_options() -> None:
    for n, r in [(576, 0.889), (192, 0.5), (5, 0.99), (10, 0.0)]:
        assert num_processed(n, r) == num_kept(n, r)
    assert alvts_options() == AlvtsOptions()
    assert alvts_options({"rank": 4, "consistency": 0}).consistency == 0.0
    assert alvts_options({"queries": 16}).queries == 16
    assert alvts_options({"rank": None}).rank is None and alvts_options({"rank": 8}).rank == 8
    with pytest.raises(ValueError, match="'ranks'"):
        alvts_options({"ranks": 4})
    with pytest.raises(ValueError, match="consistency"):
        alvts_options({"consistency": 1.0})
    with pytest.raises(ValueError, match="rank"):
        alvts_options({"rank": 2.5})
    with pytest.raises(ValueError, match="queries"):
        alvts_options({"queries": 0})
    assert is_layerwise("alvts") and not is_layerwise("lrcp")


def _bench() -> Any:
    from benchmarks import alvts_selector

    return alvts_selector


@pytest.mark.parametrize("n,queries", [(300, 20), (12, 20), (50, None)])
def test_cost_benchmark_counts_the_matmuls_that_run(n: int, queries: int | None) -> None:
    """``benchmarks.alvts_selector``'s analytic count equals the matmul FLOPs torch counts
    in a real ``route`` call (GQA, query bias, fewer tokens than query rows, every token)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _bench()
    dims = bench.Dims("t", D, 3 * D, H, G)
    router = AlvtsRouter({0: _factors(_weights(), 6)}, AlvtsOptions(
        queries=queries if queries else 1 << 30))
    with FlopCounterMode(display=False) as counter:
        router.route(0, _hidden(n, 1), n // 2, router.new_state())
    assert counter.get_total_flops() == bench.matmul_flops(dims, n, 6, queries)
    assert bench.selector_flops(dims, n, 6, queries) > bench.matmul_flops(dims, n, 6, queries)


def test_cost_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    assert bench.main(["--quick", "--models", "mid", "--sizes", "200", "--ratios", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| mid | 32 | 200 | 0.5 | 100 |" in out and "Largest share" in out
