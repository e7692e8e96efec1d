"""The API server's metrics: per-request token counts and the workers' collectors (runs in the
API server).

Token counts, requests and ratios are exact at preprocessing time, in the API server process:
the processor's per-item plans (:mod:`vllm_tokenprune.plan`) fix every keep-count before the
encoder runs, so they go straight into the API server's prometheus registry. The endpoint plugin
switches recording on (:func:`enable_frontend`), so processes that only profile dummy inputs
record nothing. The workers' scorer timings, fallbacks and skipped token-layers (``alvts``,
counted where an item is routed) arrive as files (:mod:`.exchange`), read at scrape time by
:class:`WorkerScorerCollector` and :class:`WorkerCounterCollector`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from vllm_tokenprune.metrics.exchange import (
    FALLBACKS,
    FALLBACKS_HELP,
    METRICS_DIR_ENV,
    SCORER,
    SCORER_BUCKETS,
    SCORER_HELP,
    SKIPPED,
    SKIPPED_HELP,
    read_all,
)
from vllm_tokenprune.plan import ItemPlan

RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.889, 0.9, 0.944, 0.97, 0.99, 1.0)
#: Buckets of ``tokenprune_item_kept_visual_tokens`` (tokens one item keeps).
ITEM_KEPT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

_lock = threading.Lock()
_frontend: dict[str, Any] | None = None


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
            "ratio": Histogram("tokenprune_prune_ratio",
                               "Prune ratio requested (or defaulted) per request and modality.",
                               ["model_name", "modality"], buckets=RATIO_BUCKETS),
            "item_kept": Histogram(
                "tokenprune_item_kept_visual_tokens",
                "Visual tokens one media item keeps, by what decided its count (reason: ratio, "
                "auto, detail, cap).", ["model_name", "modality", "reason"],
                buckets=ITEM_KEPT_BUCKETS),
        }


def enabled() -> bool:
    """Whether this process records request metrics (the endpoint plugin switched them on)."""
    return _frontend is not None


def record_request(model_name: str, method: str, plans: Sequence[ItemPlan],
                   ratios: dict[str, float | str]) -> None:
    """One request passed preprocessing: its items' plans, the method it asked for and the
    ratio per modality (``"auto"``: not observed as a ratio). Layer-stage items count every
    token as kept (nothing is dropped at the input); their skipped token-layers are counted by
    the worker that computes them. Each item's kept tokens also go, by the reason that decided
    them, into ``tokenprune_item_kept_visual_tokens``."""
    m = _frontend
    if m is None:
        return
    m["requests"].labels(model_name, method).inc()
    for modality, ratio in ratios.items():
        if not isinstance(ratio, str):
            m["ratio"].labels(model_name, modality).observe(ratio)
    for p in plans:
        labels = (model_name, p.method, p.modality)
        m["input"].labels(*labels).inc(p.num_tokens)
        m["kept"].labels(*labels).inc(p.kept)
        m["saved"].labels(*labels).inc(p.num_tokens - p.kept)
        m["items"].labels(*labels).inc()
        m["item_kept"].labels(model_name, p.modality, p.why).observe(p.kept)


# --------------------------------------------------------------------------- workers' files


def _summed(path: str, kind: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    """Every worker's ``kind`` series in ``path``, summed per label values (``model_name``
    first): a histogram's value lists element-wise, a counter's values."""
    merged: dict[tuple[str, ...], Any] = {}
    for data in read_all(path, kind):
        for series in data["series"]:
            key = (data["model_name"], *(series[name] for name in labels))
            value = series.get("values", series.get("value"))
            if isinstance(value, list):
                acc = merged.setdefault(key, [0.0] * len(value))
                merged[key] = [a + float(v) for a, v in zip(acc, value, strict=True)]
            else:
                merged[key] = merged.get(key, 0.0) + float(value)
    return merged


class WorkerScorerCollector:
    """Reads the workers' scorer histograms at scrape time (registered in the API server)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily("tokenprune_scorer_seconds", SCORER_HELP,
                                    labels=["model_name", "method", "modality"])
        bounds = list(SCORER_BUCKETS)  # every worker writes these (exchange.SCORER_BUCKETS)
        for labels, v in sorted(_summed(self.path, SCORER, ("method", "modality")).items()):
            buckets = [(str(b), v[i]) for i, b in enumerate(bounds)]
            buckets.append(("+Inf", v[-1]))
            fam.add_metric(list(labels), buckets, sum_value=v[-2])
        yield fam


class WorkerCounterCollector:
    """Reads one of the workers' counters at scrape time (registered in the API server)."""

    def __init__(self, path: str, name: str, help_: str, kind: str,
                 labels: tuple[str, str]) -> None:
        self.path, self.name, self.help, self.kind, self.labels = path, name, help_, kind, labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(self.name, self.help, labels=["model_name", *self.labels])
        for labels, value in sorted(_summed(self.path, self.kind, self.labels).items()):
            fam.add_metric(list(labels), value)
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
        REGISTRY.register(WorkerCounterCollector(path, "tokenprune_scorer_fallbacks",
                                                 FALLBACKS_HELP, FALLBACKS, ("method", "reason")))
        REGISTRY.register(WorkerCounterCollector(
            path, "tokenprune_skipped_visual_token_layers", SKIPPED_HELP, SKIPPED,
            ("method", "modality")))
        _collector_registered = True
