"""ALVTS selector (pure torch): factors, importance, consistency, routing, options."""

from __future__ import annotations

import pytest
import torch

from vllm_tokenprune import num_kept
from vllm_tokenprune.alvts import (
    AlvtsOptions,
    AlvtsRouter,
    alvts_options,
    combine,
    importance,
    is_layerwise,
    layer_factors,
    num_processed,
    top_tokens,
)
from vllm_tokenprune.alvts import selector as sel

H, G, DH, D = 4, 2, 16, 64


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wq": torch.randn(H * DH, D, generator=g),
        "wk": torch.randn(G * DH, D, generator=g),
        "bq": torch.randn(H * DH, generator=g),
        "bk": torch.randn(G * DH, generator=g),
        "gamma": torch.rand(D, generator=g) + 0.5,
    }


def _exact(h: torch.Tensor, w: dict[str, torch.Tensor], causal: bool = True) -> torch.Tensor:
    """The layer's real attention (no RoPE) received per token from the item, head mean."""
    n = h.shape[0]
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w["gamma"]
    q = (x @ w["wq"].T + w["bq"]).view(n, H, DH).transpose(0, 1)
    k = (x @ w["wk"].T + w["bk"]).view(n, G, DH).transpose(0, 1).repeat_interleave(H // G, 0)
    logits = q @ k.transpose(1, 2) / DH**0.5
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    rec = logits.softmax(-1).sum((0, 1))
    return rec / rec.sum()


def _factors(w: dict[str, torch.Tensor], rank: int):
    return layer_factors(w["wq"], w["wk"], num_heads=H, num_kv_heads=G, rank=rank,
                         q_bias=w["bq"], norm_weight=w["gamma"], eps=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_full_rank_equals_exact_attention_gqa_biases_gamma(causal: bool) -> None:
    w = _weights()
    h = torch.randn(23, D, generator=torch.Generator().manual_seed(1)) * 3
    got = importance(h, _factors(w, DH), causal=causal)
    torch.testing.assert_close(got, _exact(h, w, causal), atol=1e-6, rtol=1e-5)
    assert abs(float(got.sum()) - 1.0) < 1e-5


def test_truncated_factors_are_the_best_rank_r_approximation() -> None:
    w = _weights(3)
    f = _factors(w, 5)
    assert f.rank == 5 and f.left.shape == (H, D, 5)
    wq = (w["wq"].double() * w["gamma"].double()).view(H, DH, D)
    wk = (w["wk"].double() * w["gamma"].double()).view(G, DH, D).repeat_interleave(H // G, 0)
    for h in range(H):
        m = wq[h].T @ wk[h]
        u, s, vh = torch.linalg.svd(m)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        got = (f.left[h].double() @ f.right[h].double().T)
        torch.testing.assert_close(got, best, atol=1e-4 * float(s[0]), rtol=0)


def test_rank_is_capped_and_bad_shapes_refused() -> None:
    w = _weights()
    assert _factors(w, 1000).rank == DH
    with pytest.raises(ValueError, match="num_kv_heads"):
        layer_factors(w["wq"], w["wk"], num_heads=4, num_kv_heads=3, rank=4)
    with pytest.raises(ValueError, match="k_weight"):
        layer_factors(w["wq"], w["wk"][:-1], num_heads=H, num_kv_heads=G, rank=4)
    with pytest.raises(ValueError, match="rank"):
        layer_factors(w["wq"], w["wk"], num_heads=H, num_kv_heads=G, rank=0)
    with pytest.raises(ValueError, match="hidden"):
        importance(torch.randn(3, D + 1), _factors(w, 4))


def test_head_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights()
    h = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    f = _factors(w, 6)
    whole = importance(h, f)
    monkeypatch.setattr(sel, "_BLOCK_ELEMS", 40 * 40)  # one head per block
    torch.testing.assert_close(importance(h, f), whole, atol=1e-7, rtol=1e-6)


def test_non_causal_importance_is_permutation_equivariant() -> None:
    f = _factors(_weights(), 6)
    h = torch.randn(17, D, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(importance(h[perm], f, causal=False),
                               importance(h, f, causal=False)[perm], atol=1e-7, rtol=1e-5)


def test_top_tokens_ties_lowest_index_ascending() -> None:
    s = torch.tensor([0.1, 0.3, 0.3, 0.05, 0.3])
    assert top_tokens(s, 2).tolist() == [1, 2]
    assert top_tokens(s, 4).tolist() == [0, 1, 2, 4]
    assert top_tokens(s, 5).tolist() == [0, 1, 2, 3, 4]
    assert top_tokens(s, 0).tolist() == []
    assert top_tokens(s, 2).dtype == torch.int64
    with pytest.raises(ValueError):
        top_tokens(s, 6)


def test_consistency_blend_and_router_state() -> None:
    a, b = torch.tensor([0.6, 0.4]), torch.tensor([0.0, 1.0])
    assert combine(a, None, 0.5) is a
    torch.testing.assert_close(combine(a, b, 0.25), 0.75 * a + 0.25 * b)
    w0, w1 = _weights(0), _weights(1)
    router = AlvtsRouter({3: _factors(w1, 4), 2: _factors(w0, 4)},
                         AlvtsOptions(consistency=0.5))
    assert router.routed_layers == [2, 3]
    h = torch.randn(30, D, generator=torch.Generator().manual_seed(6))
    state = router.new_state()
    idx2 = router.route(2, h, 10, state)
    s2 = state["score"]
    idx3 = router.route(3, h, 10, state)
    expect = 0.5 * importance(h, router.factors[3]) + 0.5 * s2
    torch.testing.assert_close(state["score"], expect)
    assert idx3.tolist() == top_tokens(expect, 10).tolist()
    assert idx2.tolist() == top_tokens(importance(h, router.factors[2]), 10).tolist()
    # routing only sees the item: the same rows give the same decision whatever else exists
    again = router.new_state()
    assert router.route(2, h.clone(), 10, again).tolist() == idx2.tolist()


def test_keep_count_rule_and_options() -> None:
    for n, r in [(576, 0.889), (192, 0.5), (5, 0.99), (10, 0.0)]:
        assert num_processed(n, r) == num_kept(n, r)
    assert alvts_options() == AlvtsOptions()
    assert alvts_options({"rank": 4, "consistency": 0}).consistency == 0.0
    with pytest.raises(ValueError, match="'ranks'"):
        alvts_options({"ranks": 4})
    with pytest.raises(ValueError, match="consistency"):
        alvts_options({"consistency": 1.0})
    with pytest.raises(ValueError, match="rank"):
        alvts_options({"rank": 2.5})
    assert is_layerwise("alvts") and not is_layerwise("lrcp")

