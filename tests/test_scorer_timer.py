"""``tokenprune_scorer_seconds``'s timer (``metrics.ScorerTimer``): CPU wall time, CUDA events read
later without synchronising. The server-side path is covered by tests/test_prometheus.py (a pruned
image adds exactly one scorer observation on the real /metrics)."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_tokenprune.metrics import worker as metrics


class _Sink:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def __call__(self, method: str, modality: str, seconds: float) -> None:
        self.rows.append((method, modality, seconds))


def test_cpu_wall_time_recorded_at_once():
    sink = _Sink()
    timer = metrics.ScorerTimer(sink)
    with timer.time("lrcp", "image", torch.device("cpu")):
        time.sleep(0.03)
    with timer.time("resprune", "video", "cpu"):
        pass
    assert [r[:2] for r in sink.rows] == [("lrcp", "image"), ("resprune", "video")]
    assert 0.03 <= sink.rows[0][2] < 1.0
    assert 0.0 <= sink.rows[1][2] < 0.03
    assert not timer.pending


def test_cpu_error_in_scorer_records_nothing():
    sink = _Sink()
    timer = metrics.ScorerTimer(sink)
    with pytest.raises(ValueError), timer.time("lrcp", "image", "cpu"):
        raise ValueError("bad")
    assert sink.rows == []


class _FakeEvent:
    """Stands in for a CUDA event pair's end: completes when told; 'time' in ms."""

    def __init__(self, ms: float) -> None:
        self.ms, self.ready = ms, False

    def query(self) -> bool:
        return self.ready

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.ms


def test_deferred_pairs_recorded_in_order_when_complete():
    sink = _Sink()
    timer = metrics.ScorerTimer(sink, max_pending=3)
    ends = [_FakeEvent(ms) for ms in (5.0, 7.0, 9.0, 11.0)]
    for i, e in enumerate(ends):
        timer.pending.append((f"m{i}", "image", _FakeEvent(0.0), e))
    ends[1].ready = True
    assert timer.poll() == 0  # the oldest is still running: nothing out of order
    ends[0].ready = True
    assert timer.poll() == 2
    assert sink.rows == [("m0", "image", 0.005), ("m1", "image", 0.007)]
    ends[2].ready = ends[3].ready = True
    with timer.time("lrcp", "image", "cpu"):  # every timed call polls first
        pass
    assert [r[0] for r in sink.rows] == ["m0", "m1", "m2", "m3", "lrcp"]


def test_module_entry_point_feeds_the_worker_histogram(monkeypatch):
    seen = _Sink()
    monkeypatch.setattr(metrics, "_timer", metrics.ScorerTimer(seen))
    with metrics.time_scorer("lrcp", "image", torch.device("cpu")):
        pass
    assert seen.rows and seen.rows[0][:2] == ("lrcp", "image")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_no_sync_and_close_to_synchronised_time():
    dev = torch.device("cuda")
    sink = _Sink()
    timer = metrics.ScorerTimer(sink, poll_s=0.05)
    a = torch.randn(2048, 2048, device=dev)
    b = a @ a  # a long "encoder" queued before the scorer
    for _ in range(20):
        b = b @ a
    torch.cuda.set_sync_debug_mode("error")
    try:
        with timer.time("lrcp", "image", dev):
            c = a @ a
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(timer.pending) == 1 and sink.rows == []
    torch.cuda.synchronize()
    deadline = time.time() + 5
    while not sink.rows and time.time() < deadline:  # the poll thread records it
        time.sleep(0.05)
    assert len(sink.rows) == 1
    t0 = time.perf_counter()
    c = a @ a
    torch.cuda.synchronize()
    alone = time.perf_counter() - t0
    # the event time is the scorer's matmul, not the 21 queued before it
    assert sink.rows[0][2] < 5 * alone + 1e-3
    del b, c
