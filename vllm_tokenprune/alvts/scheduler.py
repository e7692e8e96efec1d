"""Schedulers that never split a media item across prefill steps (what ``alvts`` needs; runs in
the engine core).

vLLM's ``--disable-chunked-mm-input`` rolls a prefill chunk back to the start of a media item
that the chunk would only partly cover, but only when the request's computed tokens are
*before* the item (``num_computed_tokens < start_pos``). When a previous step ended exactly at
the item's start (which that very rollback produces), the next step may schedule part of the
item if the step's remaining token budget is smaller than the item: under load, an item is then
split across steps (seen in ``tests/test_alvts_server.py`` with 16 concurrent requests). Layer-wise
routing scores an item on all of its tokens' hidden states, so it needs the item whole.

:class:`WholeMediaScheduler` (synchronous) and :class:`WholeMediaAsyncScheduler` (vLLM's async
scheduling, the GPU default) apply the same rule with the boundary included: a chunk that would
start an item without finishing it stops before the item. Select one with
``--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaScheduler`` (or ``...AsyncScheduler``
when async scheduling is on); a server that enables ``alvts`` refuses to start without it,
naming the right one (:func:`vllm_tokenprune.alvts.model.check_alvts_server`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

__all__ = ["WholeMediaAsyncScheduler", "WholeMediaMixin", "WholeMediaScheduler",
           "scheduler_cls_name", "whole_media_tokens"]


def whole_media_tokens(features: Sequence[Any], num_computed: int, num_new: int) -> int:
    """``num_new`` cut so that ``[num_computed, num_computed + num_new)`` does not start a
    media item (``features[i].mm_position``: ``offset``, ``length``) without finishing it.

    An item that starts at or after ``num_computed`` and ends after the chunk is deferred to
    the next step (the chunk stops at its start; 0 if the chunk starts there). Items already
    started (only possible with a prefix-cache hit inside an item) are left to vLLM."""
    end = num_computed + num_new
    for feature in sorted(features, key=lambda f: f.mm_position.offset):
        start = int(feature.mm_position.offset)
        if start >= end:
            break
        if start >= num_computed and start + int(feature.mm_position.length) > end:
            return start - num_computed
    return num_new


class WholeMediaMixin:
    """Mix into a vLLM V1 scheduler class (before it)."""

    def _try_schedule_encoder_inputs(self, request: Any, num_computed_tokens: int,
                                     num_new_tokens: int, encoder_compute_budget: int,
                                     shift_computed_tokens: int = 0) -> Any:
        if num_new_tokens > 0 and request.has_encoder_inputs:
            num_new_tokens = whole_media_tokens(request.mm_features,
                                                num_computed_tokens + shift_computed_tokens,
                                                num_new_tokens)
            if num_new_tokens == 0:
                return [], 0, encoder_compute_budget, [], []
        return super()._try_schedule_encoder_inputs(  # type: ignore[misc]
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
            shift_computed_tokens)


class WholeMediaScheduler(WholeMediaMixin, Scheduler):
    """vLLM's scheduler; a media item is always scheduled whole, in one step."""


class WholeMediaAsyncScheduler(WholeMediaMixin, AsyncScheduler):
    """vLLM's async scheduler; a media item is always scheduled whole, in one step."""


def scheduler_cls_name(async_scheduling: bool) -> str:
    """The ``--scheduler-cls`` value for a server with or without async scheduling."""
    cls = WholeMediaAsyncScheduler if async_scheduling else WholeMediaScheduler
    return f"{cls.__module__}.{cls.__qualname__}"
