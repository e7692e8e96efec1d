"""Pruning rows a client supplies in precomputed features (runs in the API server).

vLLM's disaggregated serving (``--enable-scale-out``, ``--tokens-only``) takes already processed
media items on ``POST /inference/v1/generate``: the request's ``features`` carry each item as a
serialized ``MultiModalKwargsItem`` (``kwargs_data``, ``mm_metadata``), and those go to the
engine as they are. For a TokenPrune model an item can carry the plugin's per-item rows (the
params row ``<modality>_prune_params``, the scorer text ``<modality>_prune_text_ids``,
:mod:`vllm_tokenprune.models.wire`), which a render server's processor produced, or which a
client wrote itself. This module holds such rows to exactly what the server's own processor
would have produced for that item (:func:`check_supplied_items`), so a supplied row is served
as it would have been rendered here, or refused with a 400 naming it: a method id the server
does not know or allow, a keep-count no ratio in [0, 1) gives under ``min_keep``, a greedy
keep past ``max_greedy_keep``, a token count or grid that is not the item's own (from its
``image_grid_thw`` / ``image_sizes`` / pixels), an item larger than the encoder was profiled
with, or text ids outside the vocabulary.

vLLM internal touched (in :data:`vllm_tokenprune._vllm_internals.INTERNALS`):
``ServingTokens._validate_mm_cache_handles`` of
``vllm.entrypoints.scale_out.token_in_token_out.serving``, vLLM's own check of the supplied
items (their shared-memory handles), called with the decoded items before they go to the
engine; :func:`install_features_guard` wraps it so the rows are checked first. If the method is
missing, a server that serves those routes refuses to start (see
:func:`vllm_tokenprune.serving.TokenPruneEndpointPlugin.init_state`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_tokenprune.models.wire import (
    MAX_TEXT_TOKENS,
    METHODS_BY_ID,
    PARAMS_HEAD,
    params_key,
    text_key,
)
from vllm_tokenprune.plan import ItemPlan
from vllm_tokenprune.scoring import get_method

_MODULE = "vllm.entrypoints.scale_out.token_in_token_out.serving"
_lock = threading.Lock()


class SuppliedRowError(ValueError):
    """A supplied row the server's processor would not have produced; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _int_vector(value: Any) -> list[int] | None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return None
    return [int(v) for v in value.tolist()]


def _one_item_output(item: Mapping[str, Any]) -> dict[str, Any]:
    """The item's fields as a one-item HF processor output (what ``_tp_item_layouts`` reads)."""
    out: dict[str, Any] = {}
    for key, elem in item.items():
        data = getattr(elem, "data", None)
        out[key] = data.unsqueeze(0) if isinstance(data, torch.Tensor) else [data]
    return out


def _check_params(processor: Any, modality: str, item: Mapping[str, Any], param: str) -> None:
    cfg = processor._tp_config()
    row = _int_vector(getattr(item[params_key(modality)], "data", None))
    if row is None or len(row) < PARAMS_HEAD:
        raise SuppliedRowError(param, f"must be a 1-D integer tensor of at least {PARAMS_HEAD} "
                                      "values")
    num_keep, method_id = row[0], row[1]
    method = METHODS_BY_ID.get(method_id)
    if method is None:
        raise SuppliedRowError(param, f"unknown method id {method_id}")
    if not cfg.is_allowed(method):
        raise SuppliedRowError(param, f"method {method!r} is not allowed by this server")
    try:
        layouts = processor._tp_item_layouts(modality, _one_item_output(item))
    except Exception as e:  # noqa: BLE001 - a malformed item: refused, never a 500
        raise SuppliedRowError(param, f"the item's own fields give no layout ({e})") from None
    if not layouts or len(layouts) != 1:
        raise SuppliedRowError(param, f"the item carries no {modality} layout of its own")
    layout = layouts[0]
    expected = layout.row(num_keep, method_id)
    if row != expected:
        raise SuppliedRowError(
            param, f"does not match the item: its own layout gives "
            f"[num_keep, method_id, num_tokens, t, h, w, ...] = {expected}")
    n = layout.num_tokens
    if not min(n, cfg.min_keep) <= num_keep <= n:
        raise SuppliedRowError(
            param, f"keeps {num_keep} of {n} tokens; a prune ratio in [0, 1) keeps between "
            f"{min(n, cfg.min_keep)} and {n} (token_prune.min_keep = {cfg.min_keep})")
    # the plan this row was written from, as far as the row tells (the ratio it does not)
    plan = ItemPlan(modality, 0, method, get_method(method).stage, 0.0, n, num_keep,
                    layout.grid, tuple(layout.extra), 0, "supplied")
    try:
        processor._tp_check_plan(plan)
    except ValueError as e:
        raise SuppliedRowError(param, str(e)) from None


def _check_text(processor: Any, modality: str, item: Mapping[str, Any], param: str) -> None:
    ids = _int_vector(getattr(item[text_key(modality)], "data", None))
    if ids is None or len(ids) != MAX_TEXT_TOKENS:
        raise SuppliedRowError(param, f"must be a 1-D integer tensor of {MAX_TEXT_TOKENS} values")
    vocab = int(processor.info.get_hf_config().get_text_config().vocab_size)
    bad = next((t for t in ids if not -1 <= t < vocab), None)
    if bad is not None:
        raise SuppliedRowError(param, f"token id {bad} is outside [-1, {vocab})")


def check_supplied_items(processor: Any,
                         mm_kwargs: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> None:
    """Raise :class:`SuppliedRowError` for the first supplied item whose pruning rows the
    server's processor (a TokenPrune one) would not have produced. Items without the plugin's
    rows, and items left to the cache (``None``), are vLLM's to judge."""
    for modality, items in mm_kwargs.items():
        for i, item in enumerate(items):
            if item is None:
                continue
            where = f"features.kwargs_data.{modality}[{i}]"
            has_params = params_key(modality) in item
            if has_params:
                _check_params(processor, modality, item, f"{where}.{params_key(modality)}")
            if text_key(modality) in item:
                if not has_params:
                    raise SuppliedRowError(f"{where}.{text_key(modality)}",
                                           f"given without {params_key(modality)}")
                _check_text(processor, modality, item, f"{where}.{text_key(modality)}")


def _guarded(original: Any) -> Any:
    def _validate_mm_cache_handles(self: Any, mm_kwargs: Any, mm_hashes: Any) -> Any:
        renderer = getattr(getattr(self, "online_renderer", None), "renderer", None)
        processor = getattr(renderer, "mm_processor", None)
        if processor is not None and hasattr(processor, "_tp_config"):
            try:
                check_supplied_items(processor, mm_kwargs)
            except SuppliedRowError as e:
                return self.create_error_response(str(e), param=e.param)
        return original(self, mm_kwargs, mm_hashes)

    _validate_mm_cache_handles.__wrapped__ = original  # type: ignore[attr-defined]
    _validate_mm_cache_handles._tokenprune_guard = True  # type: ignore[attr-defined]
    return _validate_mm_cache_handles


def install_features_guard() -> bool:
    """Wrap vLLM's check of supplied features (idempotent). False when this vLLM has no such
    route or the method moved (then a server enabling those routes must not start)."""
    import importlib

    with _lock:
        try:
            module = importlib.import_module(_MODULE)
        except ImportError:
            return False
        cls = getattr(module, "ServingTokens", None)
        fn = getattr(cls, "_validate_mm_cache_handles", None)
        if fn is None:
            return False
        if not getattr(fn, "_tokenprune_guard", False):
            cls._validate_mm_cache_handles = _guarded(fn)  # type: ignore[union-attr]
        return True
