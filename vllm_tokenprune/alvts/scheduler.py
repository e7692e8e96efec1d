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
scheduling, the GPU default) apply three rules on top of vLLM's scheduler:

* **whole items**: a chunk that would start an item without finishing it stops before the item
  (:func:`whole_media_tokens`, the boundary included);
* **no starvation**: a running request whose item was deferred by that rule
  :data:`MAX_DEFERRALS` steps in a row is moved to the front of the running queue for the next
  step, so it gets the step's whole token budget (an item never exceeds it: vLLM refuses to
  start otherwise under ``--disable-chunked-mm-input``). A large image therefore waits at most
  ``MAX_DEFERRALS + 1`` steps behind a stream of small requests (a request in the waiting queue
  is never passed by a later one: vLLM stops admitting behind it);
* **prefix caching**: a prefix-cache hit that would end inside a media item (or exactly at its
  start) is cut back to the last block boundary before the item's start
  (:func:`media_cache_cut`), so the item is computed whole. Exact: an item's routing depends
  only on the item and what precedes it, and its blocks' hashes carry the item's hash, which
  carries the request's ``prune_ratio`` / ``prune_method`` and the plugin's salt (method
  options, ``min_keep``; ``cache_keys.py``), so a routed item's blocks are never reused for
  another ratio, method or options.

Select one with ``--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaScheduler`` (or
``...AsyncScheduler`` when async scheduling is on); a server that enables ``alvts`` refuses to
start without it, naming the right one (:func:`vllm_tokenprune.alvts.model.check_alvts_server`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

__all__ = ["MAX_DEFERRALS", "WholeMediaAsyncScheduler", "WholeMediaMixin",
           "WholeMediaScheduler", "media_cache_cut", "scheduler_cls_name", "whole_media_tokens"]

#: Steps in a row a running request's media item may be deferred (it does not fit the step's
#: remaining budget) before it goes first in the next step.
MAX_DEFERRALS = 4


def whole_media_tokens(features: Sequence[Any], num_computed: int, num_new: int) -> int:
    """``num_new`` cut so that ``[num_computed, num_computed + num_new)`` does not start a
    media item (``features[i].mm_position``: ``offset``, ``length``) without finishing it.

    An item that starts at or after ``num_computed`` and ends after the chunk is deferred to
    the next step (the chunk stops at its start; 0 if the chunk starts there). Items already
    started (never after :func:`media_cache_cut`) are left to vLLM."""
    end = num_computed + num_new
    for feature in sorted(features, key=lambda f: f.mm_position.offset):
        start = int(feature.mm_position.offset)
        if start >= end:
            break
        if start >= num_computed and start + int(feature.mm_position.length) > end:
            return start - num_computed
    return num_new


def media_cache_cut(features: Sequence[Any], num_cached: int, block_size: int) -> int:
    """A prefix-cache hit of ``num_cached`` tokens cut back so that it does not end inside a
    media item: the last multiple of ``block_size`` at or before the start of the item it would
    end in (``num_cached`` itself when it ends in none). A hit that would end exactly at an
    item's start is cut one block further (when there is one), so the request's first chunk
    holds a token before the item: vLLM then schedules that text and the request joins the
    running queue, where :data:`MAX_DEFERRALS` bounds its wait; a waiting request whose first
    token is an item's would hold every admission behind it until the item fits."""
    for feature in features:
        start = int(feature.mm_position.offset)
        if 0 < num_cached and start <= num_cached < start + int(feature.mm_position.length):
            cut = start - start % block_size
            return cut - block_size if cut == start and cut > 0 else cut
    return num_cached


class WholeMediaMixin:
    """Mix into a vLLM V1 scheduler class (before it)."""

    #: request id -> steps in a row its next item was deferred
    _tp_deferred: dict[str, int]

    def _tp_deferrals(self) -> dict[str, int]:
        if "_tp_deferred" not in self.__dict__:
            self._tp_deferred = {}
        return self._tp_deferred

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        deferred = self._tp_deferrals()
        requests = self.requests  # type: ignore[attr-defined]
        for rid in [r for r in deferred if r not in requests]:
            del deferred[rid]
        if any(n >= MAX_DEFERRALS for n in deferred.values()):
            running = self.running  # type: ignore[attr-defined]
            first = [r for r in running if deferred.get(r.request_id, 0) >= MAX_DEFERRALS]
            running[:] = first + [r for r in running
                                  if deferred.get(r.request_id, 0) < MAX_DEFERRALS]
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def _try_schedule_encoder_inputs(self, request: Any, num_computed_tokens: int,
                                     num_new_tokens: int, encoder_compute_budget: int,
                                     shift_computed_tokens: int = 0) -> Any:
        if num_new_tokens > 0 and request.has_encoder_inputs:
            num_new_tokens = whole_media_tokens(request.mm_features,
                                                num_computed_tokens + shift_computed_tokens,
                                                num_new_tokens)
            deferred = self._tp_deferrals()
            if num_new_tokens == 0:
                deferred[request.request_id] = deferred.get(request.request_id, 0) + 1
                return [], 0, encoder_compute_budget, [], []
            deferred.pop(request.request_id, None)
        return super()._try_schedule_encoder_inputs(  # type: ignore[misc]
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
            shift_computed_tokens)

    def _get_local_prefix_cache_hit(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        blocks, num_cached, boundary, *rest = super()._get_local_prefix_cache_hit(  # type: ignore[misc]
            request, *args, **kwargs)
        if num_cached and request.has_encoder_inputs:
            cut = media_cache_cut(request.mm_features, num_cached,
                                  self.block_size)  # type: ignore[attr-defined]
            if cut < num_cached:
                keep = cut // self.block_size  # type: ignore[attr-defined]
                blocks = KVCacheBlocks(tuple(list(g[:keep]) for g in blocks.blocks))
                num_cached, boundary = cut, (boundary if boundary <= cut else 0)
        return (blocks, num_cached, boundary, *rest)


class WholeMediaScheduler(WholeMediaMixin, Scheduler):
    """vLLM's scheduler; a media item is always scheduled whole, in one step."""


class WholeMediaAsyncScheduler(WholeMediaMixin, AsyncScheduler):
    """vLLM's async scheduler; a media item is always scheduled whole, in one step."""


def scheduler_cls_name(async_scheduling: bool) -> str:
    """The ``--scheduler-cls`` value for a server with or without async scheduling."""
    cls = WholeMediaAsyncScheduler if async_scheduling else WholeMediaScheduler
    return f"{cls.__module__}.{cls.__qualname__}"
