"""Operators per kept token of the greedy scorers, and their CUDA graph path.

Counted with the torch profiler as ``benchmarks/count_ops.py`` counts them: top-level ATen
operators per greedy step, ``(ops(k) - ops(k // 2)) / (k - k // 2)``, so set-up is excluded.

* CPU (eager loops): bounded at what issue 17 left. Twelve per step is not reachable eagerly with
  the pinned picks: a step has 13 to 14 distinct roundings plus an argmax and a row gather, and no
  fused torch operator reproduces two of them bit for bit (``docs/scorers.md``).
* The caching policy of ``_graphs.run_graphed`` on the CPU, with a stand-in for the captured graph
  that runs the loop (capture on the second sighting, replay after, memory budget, eviction, a
  failed capture turning graphs off); the capture itself needs CUDA.
* CUDA (skipped without a GPU): the loop is replayed from a captured CUDA graph once its shape
  repeats, so a step issues no operator at all (at most 12 allowed), the picks equal the eager
  loop's on the same GPU, and a replay does not synchronise with the host.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from vllm_tokenprune.scoring import _graphs, select_tokens_batch
from vllm_tokenprune.scoring._graphs import GRAPH_MB_ENV, GRAPHS_ENV, clear_graphs, graph_count
from vllm_tokenprune.scoring._greedy import residual_greedy

_spec = importlib.util.spec_from_file_location(
    "count_ops", Path(__file__).resolve().parents[1] / "benchmarks" / "count_ops.py"
)
assert _spec is not None and _spec.loader is not None
count_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_ops)

N, D, K = 576, 256, 64
# (total, launching) top-level operators per step on the CPU; B = 4 runs one mv per item
CPU_BOUNDS = {
    ("divprune", 1): (9, 7),
    ("divprune", 4): (15, 11),
    ("resprune", 1): (35, 28),
    ("resprune", 4): (65, 48),
    ("cdpruner", 1): (35, 28),
    ("cdpruner", 4): (65, 48),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(("method", "batch"), list(CPU_BOUNDS))
def test_cpu_ops_per_step(method, batch):
    total, launching, diff = count_ops.per_step(method, N, D, K, batch)
    max_total, max_launching = CPU_BOUNDS[(method, batch)]
    assert total <= max_total and launching <= max_launching, (total, launching, dict(diff))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", ["divprune", "resprune", "cdpruner"])
def test_cuda_graph_replay(monkeypatch, method, batch):
    clear_graphs()
    total, launching, diff = count_ops.per_step(method, N, D, K, batch, "cuda")
    assert total <= 12, (total, launching, dict(diff))
    assert graph_count() >= 1

    g = torch.Generator().manual_seed(1)
    sizes, ks = count_ops.batch_sizes(N, K, batch)
    feats = [torch.randn(n, D, generator=g).cuda().to(torch.bfloat16) for n in sizes]
    text = [torch.randn(4, D, generator=g).cuda() for _ in sizes]
    for _ in range(2):  # eager, then eager + capture
        select_tokens_batch(feats, ks, method, text_embeds=text)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            replayed = select_tokens_batch(feats, ks, method, text_embeds=text)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs  # the input NaN/Inf check, once per call
    monkeypatch.setenv(GRAPHS_ENV, "0")
    eager = select_tokens_batch(feats, ks, method, text_embeds=text)
    for a, b in zip(replayed, eager, strict=True):
        assert torch.equal(a, b)


class _FakeGraph:
    """Stand-in for ``_graphs._Graph`` on the CPU: "replays" by running the loop."""

    log: list[str] = []
    fail = False

    def __init__(self, fn, args, static):
        if _FakeGraph.fail:
            raise RuntimeError("capture refused")
        _FakeGraph.log.append("capture")
        self.fn, self.static = fn, static
        self.nbytes = sum(a.nbytes for a in args if a is not None)

    def __call__(self, args):
        _FakeGraph.log.append("replay")
        return self.fn(*args, *self.static)


def test_graph_policy(monkeypatch):
    monkeypatch.setattr(_graphs, "_Graph", _FakeGraph)
    monkeypatch.setattr(_graphs, "_eager_only", lambda args: _graphs._failed)
    monkeypatch.setattr(_FakeGraph, "log", [])
    clear_graphs()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 60, 8, generator=g)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 50:] = False
    want = residual_greedy(x, None, mask, 20)
    assert _FakeGraph.log == []  # first sighting: eager
    for _ in range(3):
        assert torch.equal(residual_greedy(x, None, mask, 20), want)
    assert _FakeGraph.log == ["capture", "replay", "replay"] and graph_count() == 1
    residual_greedy(x, None, mask, 19)  # another signature (k): seen once, not captured
    assert graph_count() == 1

    budget_mb = 1.5 * x.nbytes / (1 << 20)  # room for one graph: the older one is evicted
    monkeypatch.setenv(GRAPH_MB_ENV, str(budget_mb))
    for _ in range(2):
        residual_greedy(x, None, mask, 16)
    assert graph_count() == 1 and _FakeGraph.log[-1] == "capture"
    assert torch.equal(residual_greedy(x, None, mask, 20), want)  # evicted: eager again
    assert _FakeGraph.log[-1] == "capture"
    monkeypatch.setenv(GRAPH_MB_ENV, "0")  # no budget: never captured
    for _ in range(3):
        residual_greedy(x, None, mask, 18)
    assert graph_count() == 1 and _FakeGraph.log[-1] == "capture"

    monkeypatch.delenv(GRAPH_MB_ENV)
    monkeypatch.setattr(_FakeGraph, "fail", True)  # a failed capture: eager from then on
    for _ in range(2):
        assert torch.equal(residual_greedy(x, None, mask, 17), want[:, :17])
    assert _graphs._failed
    n = len(_FakeGraph.log)
    assert torch.equal(residual_greedy(x, None, mask, 20), want)  # cached graph bypassed too
    assert len(_FakeGraph.log) == n
    clear_graphs()
