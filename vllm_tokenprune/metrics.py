"""Prometheus metrics of visual-token pruning (filled in by the observability work).

The model hook calls :func:`record_item` once per media item and :func:`record_scorer_time` once
per batched scorer call. Both are cheap no-ops until metrics are enabled.
"""

from __future__ import annotations


def record_item(method: str, modality: str, *, num_tokens: int, num_kept: int) -> None:
    """One media item went through the pruning hook."""


def record_scorer_time(method: str, modality: str, seconds: float) -> None:
    """One batched scorer call took ``seconds``."""
