"""Prometheus metrics of visual-token pruning, on the API server's own ``/metrics``.

Series (labels follow vLLM's ``model_name`` convention, plus ``method`` and ``modality``):

===========================================  =========  ====================================
name                                         type       meaning
===========================================  =========  ====================================
``tokenprune_input_visual_tokens_total``     counter    visual tokens the encoder produced
``tokenprune_kept_visual_tokens_total``      counter    visual tokens given to the LM
``tokenprune_saved_visual_tokens_total``     counter    input - kept
``tokenprune_media_items_total``             counter    media items that went through pruning
``tokenprune_requests_total``                counter    requests with media, by method
``tokenprune_prune_ratio``                   histogram  the ratio requests asked for
``tokenprune_scorer_seconds``                histogram  scorer time per batched scorer call
                                                        (CPU: wall time; CUDA: event time,
                                                        :class:`ScorerTimer`)
``tokenprune_scorer_fallbacks_total``        counter    items served by the fallback (labels
                                                        ``model_name``, ``method``, ``reason``)
===========================================  =========  ====================================

Where they are measured:

* Token counts, requests and ratios are exact at preprocessing time, in the API server process
  (the processor decides the keep-count there, before the encoder runs), so they go straight
  into the API server's prometheus registry. The endpoint plugin switches recording on
  (:func:`enable_frontend`), so processes that only profile dummy inputs record nothing.
* The scorer runs in the worker process. With one API server (vLLM's default) ``/metrics``
  serves the API server's in-process registry, so the worker writes its cumulative histogram
  to a small JSON file in ``VLLM_TOKENPRUNE_METRICS_DIR`` (created by the plugin in the API
  server before the engine starts, inherited by the engine and workers) and a collector in the
  API server reads those files at scrape time (:class:`WorkerScorerCollector`). With
  ``--api-server-count > 1`` vLLM switches prometheus_client to multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``) in every process; the worker then records into an ordinary
  prometheus_client histogram, which vLLM's multiprocess collector aggregates.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

METRICS_DIR_ENV = "VLLM_TOKENPRUNE_METRICS_DIR"
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.889, 0.9, 0.944, 0.97, 0.99, 1.0)
SCORER_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0)

_lock = threading.Lock()
_frontend: dict[str, Any] | None = None
_worker: _WorkerScorerRecorder | None = None


# --------------------------------------------------------------------------- front end


def enable_frontend() -> None:
    """Create the API-server-side metrics (idempotent). Called by the endpoint plugin."""
    global _frontend
    with _lock:
        if _frontend is not None:
            return
        from prometheus_client import Counter, Histogram

        labels = ["model_name", "method", "modality"]
        _frontend = {
            "input": Counter("tokenprune_input_visual_tokens",
                             "Visual tokens produced by the vision encoder (before pruning).",
                             labels),
            "kept": Counter("tokenprune_kept_visual_tokens",
                            "Visual tokens kept and given to the language model.", labels),
            "saved": Counter("tokenprune_saved_visual_tokens",
                             "Visual tokens pruned (input - kept).", labels),
            "items": Counter("tokenprune_media_items",
                             "Media items that went through visual-token pruning.", labels),
            "requests": Counter("tokenprune_requests",
                                "Requests with media served by a TokenPrune model.",
                                ["model_name", "method"]),
            "skipped_layers": Counter(
                "tokenprune_skipped_visual_token_layers",
                "Visual token-layers skipped inside the language model by layer-wise routing "
                "(alvts): per item, (tokens - tokens routed through each layer) x routed "
                "layers.", labels),
            "ratio": Histogram("tokenprune_prune_ratio",
                               "Prune ratio requested (or defaulted) per request and modality.",
                               ["model_name", "modality"], buckets=RATIO_BUCKETS),
        }


def record_request(model_name: str, method: str,
                   items: Iterable[tuple[str, str, int, int]],
                   ratios: dict[str, float]) -> None:
    """One request passed preprocessing. ``items``: (modality, method, tokens, kept)."""
    m = _frontend
    if m is None:
        return
    m["requests"].labels(model_name, method).inc()
    for modality, ratio in ratios.items():
        m["ratio"].labels(model_name, modality).observe(ratio)
    for modality, item_method, tokens, kept in items:
        labels = (model_name, item_method, modality)
        m["input"].labels(*labels).inc(tokens)
        m["kept"].labels(*labels).inc(kept)
        m["saved"].labels(*labels).inc(tokens - kept)
        m["items"].labels(*labels).inc()


def record_routing(model_name: str, items: Iterable[tuple[str, str, int, int]],
                   routed_layers: int) -> None:
    """Layer-wise routing of one request: ``items`` (modality, method, tokens, routed through
    each layer), ``routed_layers`` the decoder layers that route."""
    m = _frontend
    if m is None:
        return
    for modality, method, tokens, through in items:
        m["skipped_layers"].labels(model_name, method, modality).inc(
            (tokens - through) * routed_layers)


# --------------------------------------------------------------------------- worker


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

            self.hist = Histogram("tokenprune_scorer_seconds",
                                  "Time of one batched scorer call in the model's vision hook.",
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
        path = os.path.join(self.dir or "", f"scorer-{os.getpid()}.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, path)
        except OSError as e:
            # The API server's directory is gone (shutting down) or not on this node (a Ray
            # worker on another machine): say so once, keep serving.
            if not getattr(self, "_warned", False):
                self._warned = True
                from vllm.logger import init_logger

                init_logger(__name__).warning(
                    "vllm-tokenprune: cannot publish scorer timings to %s (%s); "
                    "tokenprune_scorer_seconds will miss this worker", self.dir, e)


class _WorkerFallbackCounter:
    """Items the worker served by the fallback (:mod:`vllm_tokenprune.guard`), published like
    the scorer histogram: a JSON file per worker read at scrape time, or a prometheus_client
    counter in multiprocess mode."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.dir = os.environ.get(METRICS_DIR_ENV)
        self.counts: dict[tuple[str, str], float] = {}
        self.counter = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import Counter

            self.counter = Counter("tokenprune_scorer_fallbacks", FALLBACKS_HELP,
                                   ["model_name", "method", "reason"])

    def inc(self, method: str, reason: str) -> None:
        if self.counter is not None:
            self.counter.labels(self.model_name, method, reason).inc()
            return
        if not self.dir:
            return
        self.counts[(method, reason)] = self.counts.get((method, reason), 0.0) + 1
        payload = {"model_name": self.model_name,
                   "series": [{"method": m, "reason": r, "value": v}
                              for (m, r), v in self.counts.items()]}
        path = os.path.join(self.dir, f"fallbacks-{os.getpid()}.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(payload, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # the scorer recorder already warns about an unusable directory


FALLBACKS_HELP = "Media items served by the fallback (uniform subset) because pruning failed."
_fallbacks: _WorkerFallbackCounter | None = None


def record_fallback(method: str, reason: str) -> None:
    """One media item was served by the fallback (worker process)."""
    if _fallbacks is not None:
        _fallbacks.inc(method, reason)


def init_worker(model_name: str) -> None:
    """Called when a TokenPrune model is built in a worker.

    With tensor parallelism every rank runs the scorer on the same batch; only the first rank
    records, so the histogram counts scorer calls, not calls x ranks.
    """
    global _worker, _fallbacks
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
            _fallbacks = _WorkerFallbackCounter(model_name)


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


# --------------------------------------------------------------------------- API server


#: Where the worker-to-API-server directory is tried when VLLM_TOKENPRUNE_METRICS_DIR is unset:
#: the temp dir (TMPDIR), then /dev/shm (writable on most read-only-root containers).
FALLBACK_PARENTS: tuple[str | None, ...] = (None, "/dev/shm")


def ensure_metrics_dir(parents: tuple[str | None, ...] = FALLBACK_PARENTS) -> str | None:
    """Create the worker-to-API-server directory in the API server (before the engine starts).

    ``VLLM_TOKENPRUNE_METRICS_DIR`` if set (created if missing), else a fresh directory under
    the first writable of ``parents``. Never fails the server's start: on a read-only root
    filesystem without a writable fallback it logs once and returns None (the token counters
    work; only ``tokenprune_scorer_seconds`` stays empty).
    """
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        try:
            os.makedirs(path, exist_ok=True)
            return path
        except OSError as e:
            _warn_no_dir(f"{path}: {e}")
            os.environ.pop(METRICS_DIR_ENV, None)
            return None
    errors = []
    for parent in parents:
        try:
            path = tempfile.mkdtemp(prefix="vllm-tokenprune-metrics-", dir=parent)
        except OSError as e:
            errors.append(f"{parent or tempfile.gettempdir()}: {e}")
            continue
        os.environ[METRICS_DIR_ENV] = path
        atexit.register(_remove_dir, path, os.getpid())
        return path
    _warn_no_dir("; ".join(errors))
    return None


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in forked children
        shutil.rmtree(path, ignore_errors=True)


def _warn_no_dir(reason: str) -> None:
    from vllm.logger import init_logger

    init_logger(__name__).warning(
        "vllm-tokenprune: no writable directory for worker scorer timings (%s); "
        "tokenprune_scorer_seconds will stay empty. Set %s to a writable directory "
        "(e.g. an emptyDir volume) to get them.", reason, METRICS_DIR_ENV)


class WorkerScorerCollector:
    """Reads the workers' scorer histograms at scrape time (registered in the API server)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(
            "tokenprune_scorer_seconds",
            "Time of one batched scorer call in the model's vision hook.",
            labels=["model_name", "method", "modality"],
        )
        merged: dict[tuple[str, str, str], list[float]] = {}
        bounds: list[float] = list(SCORER_BUCKETS)
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            names = []
        for name in names:
            if not (name.startswith("scorer-") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.path, name)) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            bounds = data["buckets"]
            for s in data["series"]:
                key = (data["model_name"], s["method"], s["modality"])
                acc = merged.setdefault(key, [0.0] * len(s["values"]))
                for i, v in enumerate(s["values"]):
                    acc[i] += v
        for labels, v in sorted(merged.items()):
            buckets = [(str(b), v[i]) for i, b in enumerate(bounds)]
            buckets.append(("+Inf", v[-1]))
            fam.add_metric(list(labels), buckets, sum_value=v[-2])
        yield fam


_collector_registered = False


def register_worker_collector() -> None:
    """In the API server: expose the workers' scorer histograms on ``/metrics`` (idempotent)."""
    global _collector_registered
    with _lock:
        if _collector_registered or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        path = os.environ.get(METRICS_DIR_ENV)
        if not path:
            return
        from prometheus_client import REGISTRY

        REGISTRY.register(WorkerScorerCollector(path))
        REGISTRY.register(WorkerFallbackCollector(path))
        _collector_registered = True


class WorkerFallbackCollector:
    """Reads the workers' fallback counts at scrape time (registered in the API server)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily("tokenprune_scorer_fallbacks", FALLBACKS_HELP,
                                  labels=["model_name", "method", "reason"])
        merged: dict[tuple[str, str, str], float] = {}
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            names = []
        for name in names:
            if not (name.startswith("fallbacks-") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.path, name)) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            for s in data["series"]:
                key = (data["model_name"], s["method"], s["reason"])
                merged[key] = merged.get(key, 0.0) + float(s["value"])
        for labels, value in sorted(merged.items()):
            fam.add_metric(list(labels), value)
        yield fam
