"""Fallbacks of the worker's pruning hooks: an item that cannot be pruned as planned is served
another way, counted, never an exception (runs in the worker).

vLLM marks the engine dead when ``execute_model`` raises, so nothing in the hooks may raise
because of what a request sent. When scoring an item fails (NaN/Inf features, a scorer error,
an encoder/processor count mismatch, an unexpected layout) the item keeps a uniform subset of
exactly ``num_keep`` rows (its placeholder count in the prompt is fixed,
:func:`uniform_fallback`); the failure is logged once per reason and counted in
``tokenprune_scorer_fallbacks_total{model_name,method,reason}`` (:func:`report_fallback`).
"""

from __future__ import annotations

import threading

import torch

from vllm_tokenprune.log import init_logger
from vllm_tokenprune.metrics import worker as worker_metrics

logger = init_logger(__name__)

#: Fallback reasons (the ``reason`` label of ``tokenprune_scorer_fallbacks_total``).
NON_FINITE = "non_finite"
SCORER_ERROR = "scorer_error"
COUNT_MISMATCH = "count_mismatch"
LAYOUT = "layout"
POSITION_OVERFLOW = "position_overflow"
#: An ``alvts`` item arrived in a step without all of its rows (served unrouted).
PARTIAL_ITEM = "partial_item"
#: A params row the worker cannot use (unknown method id, counts out of range).
BAD_PARAMS = "bad_params"
#: The M-RoPE position fill failed (the step's media keep provisional positions).
POSITIONS = "positions"
#: Media rows reached ``embed_input_ids`` with their position channels (the runner did not
#: call ``recompute_mrope_positions``).
NO_RECOMPUTE = "no_recompute"
#: Method name of items the model side serves by the fallback without scoring.
FALLBACK_METHOD = "-fallback-"

_lock = threading.Lock()
_warned: set[str] = set()


def uniform_fallback(num_rows: int, num_keep: int, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """Exactly ``num_keep`` ascending row indices spread evenly over ``num_rows`` rows.

    Indices repeat only when ``num_rows < num_keep`` (an encoder that produced fewer rows than
    the prompt has placeholders): the prompt's placeholder count is what must match.
    """
    if num_rows <= 0 or num_keep <= 0:
        return torch.zeros(max(num_keep, 0), dtype=torch.long, device=device)
    idx = (torch.arange(num_keep, dtype=torch.long) * num_rows) // num_keep
    return idx.to(device)


def classify(exc: BaseException) -> str:
    """The fallback reason for a scorer exception."""
    return NON_FINITE if "NaN or Inf" in str(exc) else SCORER_ERROR


def report_fallback(method: str, reason: str, detail: str,
                    served: str = "it keeps a uniform subset of its tokens") -> None:
    """Log (once per reason) and count one item served by the fallback (``served``: what
    happens to the item instead)."""
    with _lock:
        first = reason not in _warned
        _warned.add(reason)
    if first:
        logger.warning(
            "vllm-tokenprune: a media item could not be pruned with %s (%s: %s); %s. Further "
            "%s fallbacks are counted in tokenprune_scorer_fallbacks_total without logging.",
            method, reason, detail, served, reason)
    worker_metrics.record_fallback(method, reason)
