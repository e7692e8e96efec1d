"""The greedy scorers pick exactly the tokens they picked before the launch-count rewrites.

Two frozen copies of the loops: ``tests/_greedy_reference_709c778.py`` (before issue 17, the picks
this rewrite must keep) and ``tests/_greedy_reference.py`` (commit 5487d03, before issue 12). The
public-API cases run ``select_tokens_batch`` as is and with each frozen loop patched in, on planted
data (incl. rank-deficient data that exhausts the basis and restarts the greedy), exact duplicates
(ties), scikit-image photographs, fp32/bf16/fp16 inputs, with, without and with mixed text, single
items and padded batches of different N. The loop cases compare the whole pick order (``k = N``,
every restart included) of the loops themselves, one item (the CPU's 2-D path) and padded batches.
Bit-identical indices are required: a changed rounding anywhere would show up as a flipped pick.
"""

from __future__ import annotations

import pytest
import torch

from tests import _greedy_reference as frozen_5487d03
from tests import _greedy_reference_709c778 as frozen_709c778
from tests.test_scoring_properties import planted
from vllm_tokenprune.scoring import cdpruner, divprune, resprune, select_tokens_batch
from vllm_tokenprune.scoring._greedy import residual_greedy

REFERENCES = {"709c778": frozen_709c778, "5487d03": frozen_5487d03}

CASES = [
    ("divprune", {}),
    ("divprune", {"start": "first"}),
    ("divprune", {"sketch_dim": 16}),
    ("resprune", {}),
    ("resprune", {"sketch_dim": 0}),
    ("resprune", {"sketch_dim": 24, "normalize_rows": True}),
    ("resprune", {"relevance_weight": 0.0}),
    ("resprune", {"relevance_weight": 1.0, "temperature": 0.01}),  # weights underflow to 0
    ("cdpruner", {}),
    ("cdpruner", {"theta": 0.0}),
    ("cdpruner", {"sketch_dim": 24, "theta": 0.8}),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two intra-op threads on busy shared cores slow these short loops down 10-20x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _use(monkeypatch: pytest.MonkeyPatch, ref) -> None:
    monkeypatch.setattr(resprune, "residual_greedy", ref.residual_greedy)
    monkeypatch.setattr(cdpruner, "residual_greedy", ref.residual_greedy)
    monkeypatch.setattr(divprune, "max_min_greedy", ref.max_min_greedy)


def _check(monkeypatch, feats, ks, method, opts, texts):
    """Today's picks equal each frozen loop's picks."""
    now = select_tokens_batch(feats, ks, method, text_embeds=texts, **opts)
    for name, ref in REFERENCES.items():
        with monkeypatch.context() as m:
            _use(m, ref)
            before = select_tokens_batch(feats, ks, method, text_embeds=texts, **opts)
        assert len(now) == len(before)
        for a, b in zip(now, before, strict=True):
            assert torch.equal(a, b), (name, a.tolist(), b.tolist())


def _planted_items():
    x, _, _, _ = planted(0)  # (400, 64): rank-4 background + planted outliers
    y, _, _, _ = planted(1, n_planted=10)
    g = torch.Generator().manual_seed(5)
    low = torch.randn(150, 3, generator=g) @ torch.randn(3, 64, generator=g)  # rank 3
    dup = torch.cat([x[:60], x[:60], x[100:130]])  # exact duplicates: ties
    return [x, y[:333], low, dup]


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_planted_single_and_batched(monkeypatch, method, opts):
    items = _planted_items()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randn(7, 64, generator=g) for _ in items]
    for frac in (0.02, 0.16, 0.5):  # several k per item, k > rank included
        ks = [max(1, int(frac * f.shape[0])) for f in items]
        for i, f in enumerate(items):  # one item at a time
            _check(monkeypatch, [f], [ks[i]], method, opts, [texts[i]])
        texts_b = texts if frac != 0.16 else [None, texts[1], None, texts[3]]
        _check(monkeypatch, items, ks, method, opts, texts_b)  # padded batch


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_photos_single_and_batched(monkeypatch, method, opts):
    pytest.importorskip("skimage.data")
    from vllm_tokenprune.testing.photos import patch_tokens

    items = [patch_tokens(name, 16, 96)[0] for name in ("astronaut", "camera", "coffee")]
    items[1] = items[1][:900]  # different N in one bucket
    g = torch.Generator().manual_seed(2)
    texts = [torch.randn(5, 96, generator=g) for _ in items]
    for k in (24, 300):
        _check(monkeypatch, items[:1], [k], method, opts, texts[:1])
        _check(monkeypatch, items, [k, k // 2, k], method, opts, texts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["resprune", "cdpruner", "divprune"])
def test_dtypes_text_and_batches(monkeypatch, method, dtype):
    """Half-precision inputs (the float32 copy the scorers make), text on all, none or some items,
    items of several sizes alone and together."""
    g = torch.Generator().manual_seed(3)
    sizes = [257, 240, 201, 17]
    feats = [(torch.randn(n, 48, generator=g) * 3).to(dtype) for n in sizes]
    feats[1][::7] = feats[1][3]  # repeated tokens: exact ties
    ks = [40, 100, 30, 16]
    text = [torch.randn(6, 48, generator=g).to(dtype) for _ in sizes]
    for texts in (text, [None] * 4, [text[0], None, text[2], None]):
        for i in range(len(sizes)):
            _check(monkeypatch, feats[i : i + 1], ks[i : i + 1], method, {}, texts[i : i + 1])
        _check(monkeypatch, feats, ks, method, {}, texts)


def _loop_inputs():
    """(name, x (N, s) float32) cases for the loops, each run to the full order k = N."""
    g = torch.Generator().manual_seed(7)
    rand = torch.randn(120, 16, generator=g)
    low = torch.randn(90, 2, generator=g) @ torch.randn(2, 24, generator=g)  # restarts
    dup = torch.cat([rand[:30]] * 3)  # every token three times
    zeros = rand.clone()
    zeros[::5] = 0.0
    # tight clusters: after the first pick the residuals are ~1e-5 of the energy, computed by
    # cancellation, so the picks turn on the last bits of every rounding (a 1-ulp change in the
    # normalisation flips them: checked when this test was written)
    base = torch.randn(16, generator=g)
    return [
        ("cluster 0.003", base + 0.003 * torch.randn(120, 16, generator=g)),
        ("cluster 0.01", base + 0.01 * torch.randn(120, 16, generator=g)),
        ("random", rand),
        ("low-rank", low),
        ("duplicates", dup),
        ("zero rows", zeros),
        ("identical", rand[:1].repeat(40, 1)),
        ("tiny", rand[:50] * 1e-17),
        ("huge", rand[:50] * 1e17),
        ("wider than long", torch.randn(12, 64, generator=g)),
        ("D = 1", torch.randn(30, 1, generator=g)),
        ("N = 1", rand[:1]),
        ("N = 2", rand[:2]),
    ]


def _padded(items):
    n_max = max(x.shape[0] for x in items)
    x = torch.zeros(len(items), n_max, items[0].shape[1])
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for i, item in enumerate(items):
        x[i, : item.shape[0]] = item
        mask[i, : item.shape[0]] = True
    return x, mask


def _weights(mask, kind):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(11)
    w = torch.rand(mask.shape, generator=g) + 0.5
    if kind == "ties":
        w = torch.where(torch.arange(mask.shape[1]) % 2 == 0, 1.0, 2.0).expand(mask.shape)
    if kind == "zeros":
        w[:, ::3] = 0.0  # zero weights (ResPrune with relevance_weight 1 can underflow to 0)
    return w.masked_fill(~mask, 1.0).contiguous()


@pytest.mark.parametrize("weights", ["none", "random", "ties", "zeros"])
def test_residual_loop_full_order(weights):
    for name, x in _loop_inputs():
        other = torch.flip(x, dims=[0])[: max(1, x.shape[0] * 3 // 4)]
        for items in ([x], [x, other, x[: max(1, x.shape[0] // 2)]]):
            xb, mask = _padded(items)
            w = _weights(mask, weights)
            got = residual_greedy(xb, w, mask, xb.shape[1])
            for ref_name, ref in REFERENCES.items():
                want = ref.residual_greedy(xb, w, mask, xb.shape[1])
                assert torch.equal(got, want), (ref_name, name, len(items))


@pytest.mark.parametrize("start", ["farthest", "first"])
def test_max_min_loop_full_order(start):
    for name, x in _loop_inputs():
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        other = torch.flip(x, dims=[0])[: max(1, x.shape[0] * 3 // 4)]
        for items in ([x], [x, other]):
            xb, mask = _padded(items)
            got = divprune.max_min_greedy(xb, mask, xb.shape[1], start)
            for ref_name, ref in REFERENCES.items():
                want = ref.max_min_greedy(xb, mask, xb.shape[1], start)
                assert torch.equal(got, want), (ref_name, name, len(items))
