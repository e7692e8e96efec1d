"""The greedy scorers pick exactly the tokens they picked before the launch-count rewrite.

``tests/_greedy_reference.py`` is a frozen copy of the loops as they were (commit 5487d03); each
case runs the public API twice, once as is and once with the frozen loop patched in, on planted
data (incl. rank-deficient data that exhausts the basis and restarts the greedy) and on
scikit-image photographs, for several N and k, single items and padded batches.
"""

from __future__ import annotations

import pytest
import torch

from tests import _greedy_reference as frozen
from tests.test_scoring_properties import planted
from vllm_tokenprune.scoring import cdpruner, divprune, resprune, select_tokens_batch

CASES = [
    ("divprune", {}),
    ("divprune", {"start": "first"}),
    ("divprune", {"sketch_dim": 16}),
    ("resprune", {}),
    ("resprune", {"sketch_dim": 0}),
    ("resprune", {"sketch_dim": 24, "normalize_rows": True}),
    ("resprune", {"relevance_weight": 0.0}),
    ("cdpruner", {}),
    ("cdpruner", {"theta": 0.0}),
    ("cdpruner", {"sketch_dim": 24, "theta": 0.8}),
]


def _use_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resprune, "residual_greedy", frozen.residual_greedy)
    monkeypatch.setattr(cdpruner, "residual_greedy", frozen.residual_greedy)
    monkeypatch.setattr(divprune, "max_min_greedy", frozen.max_min_greedy)


def _both(monkeypatch, feats, ks, method, opts, texts):
    now = select_tokens_batch(feats, ks, method, text_embeds=texts, **opts)
    with monkeypatch.context() as m:
        _use_frozen(m)
        before = select_tokens_batch(feats, ks, method, text_embeds=texts, **opts)
    return now, before


def _assert_same(now, before):
    assert len(now) == len(before)
    for a, b in zip(now, before, strict=True):
        assert torch.equal(a, b), (a.tolist(), b.tolist())


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
            _assert_same(*_both(monkeypatch, [f], [ks[i]], method, opts, [texts[i]]))
        texts_b = texts if frac != 0.16 else [None, texts[1], None, texts[3]]
        _assert_same(*_both(monkeypatch, items, ks, method, opts, texts_b))  # padded batch


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_photos_single_and_batched(monkeypatch, method, opts):
    pytest.importorskip("skimage.data")
    from vllm_tokenprune.testing.photos import patch_tokens

    items = [patch_tokens(name, 16, 96)[0] for name in ("astronaut", "camera", "coffee")]
    items[1] = items[1][:900]  # different N in one bucket
    g = torch.Generator().manual_seed(2)
    texts = [torch.randn(5, 96, generator=g) for _ in items]
    for k in (24, 300):
        _assert_same(*_both(monkeypatch, items[:1], [k], method, opts, texts[:1]))
        _assert_same(*_both(monkeypatch, items, [k, k // 2, k], method, opts, texts))
