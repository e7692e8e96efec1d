"""Worker-side safety of the pruning hook: vision-tower call budget, fallbacks, test hooks.

Three jobs, all in the worker (inside vLLM's batched encoder step), none of them scoring:

* **Encoder-call budget** (:func:`plan_chunks`, :func:`profiled_encoder_tokens`). vLLM's
  scheduler charges a media item its placeholder count against the encoder budget. A pruned
  item's placeholder count is its *kept* count, so at ratio r one step can bring the vision tower
  about 1/(1-r) times more patches than vLLM's memory profiling measured. The hook therefore runs
  the tower (and the scorer) on consecutive sub-batches whose *unpruned* token count stays within
  what profiling measured: ``mm_max_items_per_batch x mm_max_toks_per_item`` of the modality
  vLLM profiles with (:class:`vllm.multimodal.encoder_budget.MultiModalBudget`, the same numbers
  ``profile_run`` uses). A single item is never split (the vision tower attends over a whole
  item); the processor refuses, with a 400, any item whose unpruned token count exceeds
  ``mm_max_toks_per_item`` (see :meth:`TokenPruneProcessorMixin._tp_check_item`), so one item
  alone always fits what profiling measured. The pixels follow the same cut
  (:func:`stage_items`): the runners leave them on the host and each sub-batch moves only its
  own to the device.
* **Fallbacks** (:func:`uniform_fallback`, :func:`report_fallback`). vLLM marks the engine dead
  when ``execute_model`` raises, so nothing in the hook may raise because of what a request
  sent. When scoring an item fails (NaN/Inf features, a scorer error, an encoder/processor count
  mismatch, an unexpected layout) the item keeps a uniform subset of exactly ``num_keep`` rows
  (its placeholder count in the prompt is fixed), the failure is logged once per reason and
  counted in ``tokenprune_scorer_fallbacks_total{model_name,method,reason}``.
* **Test-only hooks**, inert unless their environment variable is set when the worker starts:
  ``VLLM_TOKENPRUNE_TEST_ENCODER_LOG=<file>`` appends one line per vision-tower call
  (``call <unpruned tokens> <cap>``), per encoder batch (``batch <unpruned tokens> <cap>``) and
  per staging of a sub-batch's pixels to the device (``stage <bytes> <profiled batch's pixel
  bytes, 0 until the profile run came by>``) and, measured on the tower module itself (a
  forward pre-hook, :func:`watch_tower`), one line per call the tower receives (``tower
  <tokens in its input> <cap>``);
  ``VLLM_TOKENPRUNE_TEST_NAN_TOKENS=<N>`` makes the scorer see NaN features for every item of
  exactly N tokens; ``VLLM_TOKENPRUNE_TEST_FAULTS=<site>:<N>[,...]`` makes one failure site of
  the worker fail for items of N rows (``*``: every item), see :data:`FAULT_SITES`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from vllm.logger import init_logger

logger = init_logger(__name__)

ENCODER_LOG_ENV = "VLLM_TOKENPRUNE_TEST_ENCODER_LOG"
NAN_TOKENS_ENV = "VLLM_TOKENPRUNE_TEST_NAN_TOKENS"
FAULTS_ENV = "VLLM_TOKENPRUNE_TEST_FAULTS"

#: Test-only failure sites (``VLLM_TOKENPRUNE_TEST_FAULTS``), each keyed on a row count N:
#: the params row of an item keeping N rows names an unknown method (``params``); the encoder
#: gives an item keeping N rows one row fewer than its grid (``count_mismatch``); the M-RoPE
#: position fill fails for a request whose step carries N media rows (``positions``); the
#: runner skips ``recompute_mrope_positions`` for such a request (``no_recompute``); reading
#: the routed items of a step fails when an ``alvts`` item has N rows (``alvts_take``).
FAULT_PARAMS = "params"
FAULT_COUNT_MISMATCH = "count_mismatch"
FAULT_POSITIONS = "positions"
FAULT_NO_RECOMPUTE = "no_recompute"
FAULT_ALVTS_TAKE = "alvts_take"
FAULT_SITES = (FAULT_PARAMS, FAULT_COUNT_MISMATCH, FAULT_POSITIONS, FAULT_NO_RECOMPUTE,
               FAULT_ALVTS_TAKE)


def parse_faults(value: str | None) -> dict[str, int | None]:
    """``"site:N,site:*"`` -> {site: N or None (every item)}; ValueError on an unknown site."""
    out: dict[str, int | None] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        site, _, count = part.strip().partition(":")
        if site not in FAULT_SITES:
            raise ValueError(f"{FAULTS_ENV}: unknown site {site!r}; sites: {FAULT_SITES}")
        out[site] = None if count in ("", "*") else int(count)
    return out


_ENCODER_LOG = os.environ.get(ENCODER_LOG_ENV) or None
_NAN_TOKENS = int(os.environ[NAN_TOKENS_ENV]) if os.environ.get(NAN_TOKENS_ENV) else None
_FAULTS = parse_faults(os.environ.get(FAULTS_ENV))

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


# --------------------------------------------------------------------------- encoder budget


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


def log_encoder_call(kind: str, tokens: int, cap: int | None) -> None:
    """Test-only: record one vision-tower call or encoder batch (inert unless the env is set)."""
    if _ENCODER_LOG is None:
        return
    with _lock, open(_ENCODER_LOG, "a") as f:
        f.write(f"{kind} {tokens} {cap if cap else 0}\n")


# --------------------------------------------------------------------------- fallbacks


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
    from vllm_tokenprune import metrics

    with _lock:
        first = reason not in _warned
        _warned.add(reason)
    if first:
        logger.warning(
            "vllm-tokenprune: a media item could not be pruned with %s (%s: %s); %s. Further "
            "%s fallbacks are counted in tokenprune_scorer_fallbacks_total without logging.",
            method, reason, detail, served, reason)
    metrics.record_fallback(method, reason)


def poison_for_test(feats: Sequence[torch.Tensor], num_tokens: Sequence[int]
                    ) -> list[torch.Tensor]:
    """Test-only: NaN features for items of ``VLLM_TOKENPRUNE_TEST_NAN_TOKENS`` tokens."""
    if _NAN_TOKENS is None:
        return list(feats)
    return [f * float("nan") if n == _NAN_TOKENS else f
            for f, n in zip(feats, num_tokens, strict=True)]


def fault_for_test(site: str, rows: int, *, raise_: bool = False) -> bool:
    """Test-only: whether ``site`` fails for an item of ``rows`` rows
    (``VLLM_TOKENPRUNE_TEST_FAULTS``); ``raise_``: raise instead of returning True."""
    if site not in _FAULTS:
        return False
    count = _FAULTS[site]
    if count is not None and count != rows:
        return False
    if raise_:
        raise RuntimeError(f"test fault at {site} ({FAULTS_ENV})")
    return True


def shorten_for_test(embeds: Sequence[torch.Tensor], params: torch.Tensor | None
                     ) -> Sequence[torch.Tensor]:
    """Test-only: one row fewer for items whose params row keeps the ``count_mismatch``
    fault's N rows (an encoder/processor count mismatch)."""
    if FAULT_COUNT_MISMATCH not in _FAULTS or not isinstance(params, torch.Tensor):
        return embeds
    keeps = [int(r[0]) for r in params.reshape(len(embeds), -1).tolist()]
    return [e[:-1] if fault_for_test(FAULT_COUNT_MISMATCH, k) else e
            for e, k in zip(embeds, keeps, strict=True)]
def watch_tower(model: Any, cap: int | None) -> None:
    """Test-only: log ``tower <tokens> <cap>`` for every input the model's vision tower
    receives (inert unless ``VLLM_TOKENPRUNE_TEST_ENCODER_LOG`` is set). The tokens are the
    patch rows of its first argument over the merge unit (Qwen-VL towers: ``(patches, C)``
    pixel rows, ``spatial_merge_size ** 2`` patches a token); other towers are not watched."""
    tower = getattr(model, "visual", None)
    merge = getattr(tower, "spatial_merge_size", None)
    if _ENCODER_LOG is None or tower is None or not isinstance(merge, int):
        return

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            log_encoder_call("tower", int(args[0].shape[0]) // (merge * merge), cap)

    tower.register_forward_pre_hook(hook)
