"""The worker's metrics: scorer time, fallbacks, skipped token-layers (runs in the worker).

``tokenprune_scorer_seconds`` (:class:`ScorerTimer`, its only writer),
``tokenprune_scorer_fallbacks_total`` (:func:`record_fallback`) and
``tokenprune_skipped_visual_token_layers_total`` (:func:`record_skipped`). Each worker publishes its
cumulative series as a file of :mod:`.exchange`, which the API server's collectors read at
scrape time (:mod:`.frontend`); with ``--api-server-count > 1`` (``PROMETHEUS_MULTIPROC_DIR``)
it records into prometheus_client series instead, which vLLM's multiprocess collector
aggregates.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from vllm_tokenprune.log import init_logger
from vllm_tokenprune.metrics import exchange
from vllm_tokenprune.metrics.exchange import METRICS_DIR_ENV, SCORER_BUCKETS, publish

_lock = threading.Lock()
_worker: _WorkerScorerRecorder | None = None
_fallbacks: _WorkerCounter | None = None
_skipped: _WorkerCounter | None = None


class _WorkerScorerRecorder:
    """Cumulative scorer-time histogram of one worker process, published for the API server."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.dir = os.environ.get(METRICS_DIR_ENV)
        self.series: dict[tuple[str, str], list[float]] = {}
        self.hist = None
        if self.multiproc:
            from prometheus_client import Histogram

            self.hist = Histogram("tokenprune_scorer_seconds", exchange.SCORER_HELP,
                                  ["model_name", "method", "modality"], buckets=SCORER_BUCKETS)

    def observe(self, method: str, modality: str, seconds: float) -> None:
        if self.hist is not None:
            self.hist.labels(self.model_name, method, modality).observe(seconds)
            return
        if not self.dir:
            return
        counts = self.series.setdefault((method, modality), [0.0] * (len(SCORER_BUCKETS) + 2))
        for i, bound in enumerate(SCORER_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-2] += seconds  # sum
        counts[-1] += 1  # count (also the +Inf bucket)
        self._publish()

    def _publish(self) -> None:
        payload = {
            "model_name": self.model_name,
            "buckets": list(SCORER_BUCKETS),
            "series": [{"method": m, "modality": mod, "values": v}
                       for (m, mod), v in self.series.items()],
        }
        try:
            publish(self.dir or "", exchange.SCORER, payload)
        except OSError as e:
            # The API server's directory is gone (shutting down) or not on this node (a Ray
            # worker on another machine): say so once, keep serving.
            if not getattr(self, "_warned", False):
                self._warned = True
                init_logger(__name__).warning(
                    "vllm-tokenprune: cannot publish scorer timings to %s (%s); "
                    "tokenprune_scorer_seconds will miss this worker", self.dir, e)


class _WorkerCounter:
    """A counter of the worker (fallbacks, skipped token-layers), published like the scorer
    histogram: a file per worker read at scrape time, or a prometheus_client counter in
    multiprocess mode."""

    def __init__(self, model_name: str, name: str, help_: str, kind: str,
                 labels: tuple[str, str]) -> None:
        self.model_name = model_name
        self.kind = kind
        self.labels = labels
        self.dir = os.environ.get(METRICS_DIR_ENV)
        self.counts: dict[tuple[str, str], float] = {}
        self.counter = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import Counter

            self.counter = Counter(name, help_, ["model_name", *labels])

    def inc(self, a: str, b: str, value: float = 1.0) -> None:
        if self.counter is not None:
            self.counter.labels(self.model_name, a, b).inc(value)
            return
        if not self.dir:
            return
        self.counts[(a, b)] = self.counts.get((a, b), 0.0) + value
        payload = {"model_name": self.model_name,
                   "series": [{self.labels[0]: x, self.labels[1]: y, "value": v}
                              for (x, y), v in self.counts.items()]}
        try:
            publish(self.dir, self.kind, payload)
        except OSError:
            pass  # the scorer recorder already warns about an unusable directory


def record_fallback(method: str, reason: str) -> None:
    """One media item was served by the fallback (worker process)."""
    if _fallbacks is not None:
        _fallbacks.inc(method, reason)


def record_skipped(method: str, modality: str, token_layers: int) -> None:
    """A routed item skipped ``token_layers`` visual token-layers (worker process)."""
    if _skipped is not None and token_layers > 0:
        _skipped.inc(method, modality, float(token_layers))


def init_worker(model_name: str) -> None:
    """Called when a TokenPrune model is built in a worker.

    With tensor parallelism every rank runs the scorer on the same batch; only the first rank
    records, so the histogram counts scorer calls, not calls x ranks.
    """
    global _worker, _fallbacks, _skipped
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        if get_tensor_model_parallel_rank() != 0:
            return
    except Exception:  # not initialised (e.g. a unit test): record
        pass
    with _lock:
        if _worker is None:
            _worker = _WorkerScorerRecorder(model_name)
        if _fallbacks is None:
            _fallbacks = _WorkerCounter(model_name, "tokenprune_scorer_fallbacks",
                                        exchange.FALLBACKS_HELP, exchange.FALLBACKS,
                                        ("method", "reason"))
        if _skipped is None:
            _skipped = _WorkerCounter(model_name, "tokenprune_skipped_visual_token_layers",
                                      exchange.SKIPPED_HELP, exchange.SKIPPED,
                                      ("method", "modality"))


def record_scorer_time(method: str, modality: str, seconds: float) -> None:
    """One batched scorer call took ``seconds`` (worker process)."""
    if _worker is not None:
        with _record_lock:
            _worker.observe(method, modality, seconds)


_record_lock = threading.Lock()


class ScorerTimer:
    """Times the scorer calls of one worker; the only writer of ``tokenprune_scorer_seconds``.

    * CPU (and any non-CUDA device): ``time.perf_counter()`` around the call; the work is
      synchronous, so that is the scorer's time.
    * CUDA: the scorer's kernels run asynchronously behind the vision encoder's, so host time
      would measure the encoder's tail (the scorer's first synchronisation waits for it). Two
      CUDA events with timing are recorded on the current stream around the call instead, and
      read later, off the hot path and without synchronising: pending (start, end) pairs are
      polled with ``end.query()`` (``cudaEventQuery``, non-blocking) at the next timed call and by
      a daemon thread every ``poll_s`` while any are pending; a completed pair is recorded with
      ``start.elapsed_time(end)``, the GPU time from the scorer's first kernel's queue position
      to its last (launch gaps included: a launch-bound scorer shows its real latency).
    """

    def __init__(self, record: Any = None, poll_s: float = 0.2, max_pending: int = 4096) -> None:
        self._record = record or record_scorer_time
        self.poll_s = poll_s
        self.max_pending = max_pending
        self.pending: deque[tuple[str, str, Any, Any]] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def time(self, method: str, modality: str, device: Any) -> Iterator[None]:
        """Time the body: one scorer call of ``method`` on ``device``'s items."""
        import torch

        self.poll()
        if getattr(device, "type", device) != "cuda":
            start = time.perf_counter()
            yield
            self._record(method, modality, time.perf_counter() - start)
            return
        stream = torch.cuda.current_stream(device)
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        begin.record(stream)
        yield
        end.record(stream)
        with self._lock:
            if len(self.pending) >= self.max_pending:  # a stalled GPU: drop, never block
                self.pending.popleft()
            self.pending.append((method, modality, begin, end))
        self._ensure_thread()

    def poll(self) -> int:
        """Record every completed pending pair (in order; non-blocking). Returns how many."""
        done = []
        with self._lock:
            while self.pending and self.pending[0][3].query():
                done.append(self.pending.popleft())
        for method, modality, begin, end in done:
            self._record(method, modality, begin.elapsed_time(end) / 1e3)
        return len(done)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._poll_loop, name="tokenprune-scorer-timer",
                                        daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while True:
            time.sleep(self.poll_s)
            self.poll()
            with self._lock:
                if not self.pending:
                    self._thread = None
                    return


_timer = ScorerTimer()


def time_scorer(method: str, modality: str, device: Any) -> AbstractContextManager[None]:
    """``with metrics.time_scorer(method, modality, device): <one batched scorer call>``."""
    return _timer.time(method, modality, device)
