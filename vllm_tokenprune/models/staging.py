"""Encoder sub-batches within the profiled budget, and pixel staging (runs in the worker).

vLLM's scheduler charges a media item its placeholder count against the encoder budget. A pruned
item's placeholder count is its *kept* count, so at ratio r one step can bring the vision tower
about 1/(1-r) times more patches than vLLM's memory profiling measured. The model therefore runs
the tower (and the scorer) on consecutive sub-batches whose *unpruned* token count stays within
what profiling measured (:func:`plan_chunks`): ``mm_max_items_per_batch x mm_max_toks_per_item``
of the modality vLLM profiles with (:func:`profiled_encoder_tokens`, the same numbers
``profile_run`` uses). A single item is never split (the vision tower attends over a whole
item); the processor refuses, with a 400, any item whose unpruned token count exceeds
``mm_max_toks_per_item``, so one item alone always fits what profiling measured. The pixels
follow the same cut (:func:`slice_items`, :func:`stage_items`): the runners leave them on the
host and each sub-batch moves only its own to the device. The mixin that drives this is
:class:`vllm_tokenprune.models.encoder_budget.EncoderBudgetMixin`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def plan_chunks(charges: Sequence[int], cap: int | None, sizes: Sequence[int] | None = None,
                size_cap: int | None = None) -> list[range]:
    """Split items (in order) into consecutive groups whose charges sum to at most ``cap`` and,
    when both are given, whose ``sizes`` (pixel bytes) sum to at most ``size_cap``.

    An item over either bound alone forms a group of its own (items are never split). A bound
    that is None or <= 0 does not apply; with neither: one group.
    """
    n = len(charges)
    if n == 0:
        return []
    cap = cap if cap and cap > 0 else None
    size_cap = size_cap if sizes is not None and size_cap and size_cap > 0 else None
    if cap is None and size_cap is None:
        return [range(n)]
    out: list[range] = []
    start, total, size = 0, 0, 0
    for i, c in enumerate(charges):
        s = sizes[i] if sizes is not None and size_cap is not None else 0
        over = ((cap is not None and total + c > cap)
                or (size_cap is not None and size + s > size_cap))
        if i > start and over:
            out.append(range(start, i))
            start, total, size = i, 0, 0
        total += c
        size += s
    out.append(range(start, n))
    return out


def profiled_encoder_tokens(vllm_config: Any) -> tuple[int | None, dict[str, int]]:
    """(tokens one vision-tower call was profiled with, largest item per modality).

    The same numbers vLLM's ``profile_run`` uses: its dummy batch holds
    ``mm_max_items_per_batch[m]`` items of ``mm_max_toks_per_item[m]`` tokens of the modality
    ``m`` with the most tokens per item. (None, {}) when there is no encoder budget.
    """
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    budget = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False)
    per_item = dict(budget.mm_max_toks_per_item)
    if budget.get_encoder_budget() <= 0 or not per_item:
        return None, per_item
    modality = budget.get_modality_with_max_tokens()
    return budget.mm_max_items_per_batch[modality] * per_item[modality], per_item


def _fields(mm_input: Any) -> dict[str, Any]:
    """The fields of a parsed multimodal input (vLLM ``TensorSchema`` or dict)."""
    if isinstance(mm_input, dict):
        return dict(mm_input)
    return {k: v for k, v in vars(mm_input).items() if not k.startswith("_")}


def _with_fields(mm_input: Any, fields: dict[str, Any]) -> Any:
    """A copy of ``mm_input`` with ``fields`` set (a shallow copy of a ``TensorSchema``)."""
    if isinstance(mm_input, dict):
        return {**mm_input, **fields}
    import copy

    out = copy.copy(mm_input)
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def slice_items(mm_input: Any, items: range, num_items: int,
                flat: dict[str, Sequence[int]] | None = None) -> Any:
    """A copy of a parsed multimodal input (vLLM ``TensorSchema`` or dict) holding only
    ``items``.

    Every field with one entry per item (``len == num_items``) is sliced by item; fields named
    in ``flat`` are concatenations over items, sliced by the given per-item row counts (Qwen's
    ``pixel_values``). Everything else (e.g. ``type``) is kept as is.
    """
    flat = flat or {}
    out: dict[str, Any] = {}
    for key, value in _fields(mm_input).items():
        if key in flat:
            rows = list(flat[key])
            lo = sum(rows[: items.start])
            hi = lo + sum(rows[items.start: items.stop])
            out[key] = value[lo:hi]
        elif isinstance(value, (torch.Tensor, list, tuple)) and len(value) == num_items:
            out[key] = value[items.start: items.stop]
        else:
            out[key] = value
    if isinstance(mm_input, dict):
        return out
    return _with_fields(mm_input, out)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def item_bytes(mm_input: Any, keys: Sequence[str], num_items: int,
               flat: dict[str, Sequence[int]] | None = None) -> list[int]:
    """Bytes of the fields ``keys`` per item (fields in ``flat``: per-item row counts of a
    concatenation, as in :func:`slice_items`; other fields: one entry per item)."""
    out = [0] * num_items
    fields = _fields(mm_input)
    for key in keys:
        value = fields.get(key)
        if value is None:
            continue
        if flat and key in flat:
            row = _nbytes(value[0]) if len(value) else 0
            for i, rows in enumerate(flat[key]):
                out[i] += int(rows) * row
        elif isinstance(value, (torch.Tensor, list, tuple)) and len(value) == num_items:
            for i in range(num_items):
                out[i] += _nbytes(value[i])
    return out


def _to_device(value: Any, device: torch.device, pin: bool) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, pin) for v in value)
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    if pin and value.is_cpu and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def stage_items(mm_input: Any, keys: Sequence[str], device: torch.device,
                pin: bool = False) -> tuple[Any, int]:
    """(a copy of ``mm_input`` whose fields ``keys`` are on ``device``, their bytes).

    The pixel fields reach ``embed_multimodal`` on the host (the processor declares them
    ``keep_on_cpu``); each encoder sub-batch moves only its own pixels to the device, just
    before its vision-tower call (pinned first when ``pin``, then ``non_blocking``), so the
    device never holds more pixels than the profiled batch did. Tensors, or lists/tuples of
    them (LLaVA's per-item pixels); anything already on ``device`` stays as it is.
    """
    fields = _fields(mm_input)
    moved = {k: fields[k] for k in keys if fields.get(k) is not None}
    if not moved:
        return mm_input, 0
    nbytes = sum(_nbytes(v) for v in moved.values())
    moved = {k: _to_device(v, device, pin) for k, v in moved.items()}
    return _with_fields(mm_input, moved), nbytes
