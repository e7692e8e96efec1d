"""The processor side of visual-token pruning (runs where vLLM preprocesses requests, the API
server).

* resolves the request's pruning fields once, from its ``mm_processor_kwargs`` (put there by the
  endpoint plugin) or the server's ``token_prune`` block, into a plan
  (:mod:`vllm_tokenprune.plan`), and each media item into an :class:`~vllm_tokenprune.plan.
  ItemPlan` whose keep-count (:func:`vllm_tokenprune.num_kept`) is fixed *before* the encoder
  runs: the prompt gets exactly the placeholder tokens of the pruned item;
* carries one params row per item to the model (:mod:`.wire`), written from its plan;
* for text-conditioned methods, carries the text of the item's own chat message
  (:mod:`vllm_tokenprune.cache_keys`);
* salts the cache hash of every pruned item with what its selection depends on beyond the
  media and the request's kwargs (plugin version, method, options, min_keep, the scorer's
  text), see :mod:`vllm_tokenprune.cache_keys`;
* refuses (400) an item the worker could not serve safely: more tokens before pruning than the
  largest item vLLM profiled the encoder with (pruning would otherwise let such an item in, as
  the prompt only holds its kept tokens), or a grid too large for the position encoding;
* budgets (docs/budgets.md): ``prune_ratio: "auto"`` estimates each item's count from the HF
  processor's pixels (:mod:`vllm_tokenprune.budget`), an image's ``detail`` and the request's
  ``max_visual_tokens`` bound it (:func:`vllm_tokenprune.plan.item_counts`); a capped request's
  items are planned together, so a capped request partly in vLLM's processor cache is
  processed whole (the cached items come back from the cache unchanged: their keys carry the
  whole request, see :meth:`_get_mm_hashes`);
* processes vLLM's profiling dummy inputs (``get_dummy_mm_inputs``: the profile run, the encoder
  budget) unpruned and marked, never refused: the worker profiles the unpruned batch and runs
  every allowed scorer at its worst on it (:mod:`.encoder_budget`);
* declares the pixel fields ``keep_on_cpu``, so the model stages them to the device one encoder
  sub-batch at a time (:func:`vllm_tokenprune.models.staging.stage_items`).

vLLM also runs the processor in the engine core and the worker, for its dummy inputs
(``MultiModalBudget``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from vllm_tokenprune import __version__, response
from vllm_tokenprune._vllm_internals import API_SERVER_PROCESS_PREFIX
from vllm_tokenprune.budget import (
    AutoCounter,
    AutoOptions,
    auto_options,
    kernel,
    pixel_scale,
)
from vllm_tokenprune.cache_keys import message_text_ids, pruned_item_salt
from vllm_tokenprune.config import AUTO, SEALED_FIELDS, TokenPruneConfig, config_from_hf_config
from vllm_tokenprune.metrics import frontend as metrics
from vllm_tokenprune.models.wire import (
    MAX_TEXT_TOKENS,
    PARAMS_HEAD,
    STAGED_FIELDS,
    Grid,
    ItemLayout,
    params_key,
    profile_key,
    text_key,
)
from vllm_tokenprune.plan import (
    MODALITIES,
    ItemPlan,
    RequestPlan,
    item_counts,
    resolve_request,
)
from vllm_tokenprune.scoring import INPUT, LAYER, get_method

_prompt_text_ids: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "tokenprune_prompt_text_ids", default=None
)
#: Per modality, the text ids each item's scorer sees (its own message), for this request.
_item_text_ids: contextvars.ContextVar[dict[str, list[tuple[int, ...]]] | None] = (
    contextvars.ContextVar("tokenprune_item_text_ids", default=None))
#: Per modality, the original indices of the items vLLM's processor cache missed (the items
#: ``_apply_hf_processor_main`` processes now), for this request.
_missing_items: contextvars.ContextVar[dict[str, list[int]] | None] = contextvars.ContextVar(
    "tokenprune_missing_items", default=None)
#: Per modality, each item's plan as its placeholder content carries it (see :func:`_counted`),
#: for this request; None per item: not pruned (e.g. precomputed embeddings).
_item_plans: contextvars.ContextVar[dict[str, list[ItemPlan | None]] | None] = (
    contextvars.ContextVar("tokenprune_item_plans", default=None))
#: Per modality, the plans of the items processed now (in processing order), for this request:
#: the placeholder content carries them (with their ``why``, which the params row does not).
_new_plans: contextvars.ContextVar[dict[str, list[ItemPlan]] | None] = contextvars.ContextVar(
    "tokenprune_new_plans", default=None)
#: This request's plan (:func:`vllm_tokenprune.plan.resolve_request`), set by ``apply``.
_request_plan: contextvars.ContextVar[RequestPlan | None] = contextvars.ContextVar(
    "tokenprune_request_plan", default=None)

_counted_class: Any = None


def _counted(content: Any, plan: ItemPlan) -> Any:
    """``content`` (an item's placeholder tokens, a list or vLLM's ``PromptUpdateDetails``) as a
    ``PromptUpdateDetails`` that also carries the item's plan.

    vLLM's processor caches (all kinds: ``lru``, ``shm``, processor-only) keep an item's resolved
    placeholder content with the item and hand it back on every hit, in the process that holds
    the entry; vLLM cannot build the prompt of a hit without it. So the counts come back exactly
    whenever the item does, whichever request (or API server process) first processed it.
    """
    global _counted_class
    if _counted_class is None:
        from dataclasses import dataclass

        from vllm.multimodal.processing import PromptUpdateDetails

        @dataclass
        class CountedUpdateDetails(PromptUpdateDetails):
            tp_plan: ItemPlan | None = None

        _counted_class = CountedUpdateDetails
    full = getattr(content, "full", content)
    return _counted_class(full=list(full), is_embed=getattr(content, "is_embed", None),
                          tp_plan=plan)
#: True while vLLM builds its profiling dummy inputs (``get_dummy_mm_inputs``) in this context.
_profiling: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tokenprune_profiling", default=False)
#: Hash suffix of the profiling dummy items (they carry a field no request's items carry).
PROFILE_SALT = "-tpprofile"


def _tp_in_api_server() -> bool:
    """This process is one of vLLM's API servers: the top process (vLLM's engine core and
    workers are its children, by multiprocessing), or one it starts for ``--api-server-count``
    above 1, named ``ApiServer_<i>`` (:data:`~vllm_tokenprune._vllm_internals.INTERNALS`)."""
    if multiprocessing.parent_process() is None:
        return True
    return multiprocessing.current_process().name.startswith(API_SERVER_PROCESS_PREFIX)


class TokenPruneProcessorMixin:
    """Mix into a ``BaseMultiModalProcessor`` subclass, before the vLLM class in the MRO.

    Per-architecture hooks: :meth:`_tp_item_layouts` (by default from ``<modality>_grid_thw``
    through :meth:`_tp_grid`) and :meth:`_tp_pruned_tokens` (by default the model's own
    placeholder replacement, one repeated token, cut to the keep-count).
    """

    info: Any
    #: Whether precomputed embedding items (``image_embeds``) are pruned like pixel items.
    #: Qwen-VL: yes (their embedding input carries ``image_grid_thw``, which lays the item
    #: out); LLaVA / LLaVA-NeXT: no (no grid or image size comes with the embeddings).
    tp_prunes_embeds: ClassVar[bool] = True

    # -- per-architecture hooks
    def _tp_grid(self, modality: str, item_grid: torch.Tensor) -> Grid:
        """The LM token grid of an item from its ``<modality>_grid_thw`` row."""
        raise NotImplementedError

    def _tp_item_layouts(self, modality: str, hf_out: Mapping[str, Any]) -> list[ItemLayout] | None:
        """One :class:`ItemLayout` per item of ``modality`` in the HF processor output (None:
        the output has no such items)."""
        grids = hf_out.get(f"{modality}_grid_thw")
        if grids is None:
            return None
        out = []
        for g in grids:
            t, h, w = self._tp_grid(modality, g)
            out.append(ItemLayout(t * h * w, (t, h, w)))
        return out

    def _tp_pruned_tokens(self, modality: str, full: list[int], params: ItemPlan) -> list[int]:
        """The placeholder tokens of a pruned item, from the unpruned replacement ``full``."""
        if len(set(full)) != 1:
            raise NotImplementedError(
                "token pruning needs a replacement made of one repeated placeholder token"
            )
        if len(full) != params.num_tokens:
            raise RuntimeError(
                f"vllm-tokenprune: the {modality} placeholder has {len(full)} tokens but the "
                f"processor counted {params.num_tokens}"
            )
        return full[:1] * params.num_keep

    # -- config
    def _tp_config(self) -> TokenPruneConfig:
        cfg = getattr(self, "_tp_cfg", None)
        if cfg is None:
            cfg = config_from_hf_config(self.info.get_hf_config())
            self._tp_auto = auto_options(cfg.auto)  # a bad token_prune.auto stops start-up
            self._tp_cfg = cfg
        return cfg

    def _tp_auto_options(self) -> AutoOptions:
        self._tp_config()
        return self._tp_auto

    def _tp_plan(self, mm_kwargs: Mapping[str, object]) -> RequestPlan:
        """This request's plan: resolved once per ``apply`` (vLLM's profiling dummies: ratio 0,
        see :meth:`get_dummy_mm_inputs`); a RequestFieldError (a 400) names a bad field."""
        plan = _request_plan.get()
        return plan if plan is not None else self._tp_resolve_plan(mm_kwargs)

    def _tp_resolve_plan(self, mm_kwargs: Mapping[str, object]) -> RequestPlan:
        return resolve_request(self._tp_config(), mm_kwargs, profiling=_profiling.get(),
                               num_layers=self._tp_num_layers)

    def _tp_num_layers(self) -> int:
        """The language model's decoder layers (what a layer-stage method acts on)."""
        return int(self.info.get_hf_config().get_text_config().num_hidden_layers)

    # -- vLLM hooks
    def get_dummy_mm_inputs(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's dummy inputs of the largest media (the profile run's encoder batch, the
        encoder budget), processed unpruned and marked with ``<modality>_prune_profile``.

        Unpruned: the profile then measures the vision tower and an encoder cache of full-size
        outputs, the most a request can cost (a pruned item's outputs are smaller), and nothing
        about the server's default can refuse it (a greedy default whose keep-count exceeds
        ``max_greedy_keep`` on the largest item used to stop start-up). Marked: the worker runs
        every allowed scorer at its worst on the marked batch (``_tp_profile_sweep``), and only
        there. Never counted in the request metrics.
        """
        token = _profiling.set(True)
        try:
            out = super().get_dummy_mm_inputs(*args, **kwargs)  # type: ignore[misc]
        finally:
            _profiling.reset(token)
        self._tp_warm_auto()
        return out

    def _tp_warm_auto(self) -> None:
        """Where the server's default is ``auto``, compile (or load) ``auto``'s pass now, in
        each API server process (:func:`_tp_in_api_server`): vLLM builds the dummy inputs at
        start-up (its renderer's warm-up among others), so the first request does not pay it
        (:func:`vllm_tokenprune.budget.kernel.warm`). A per-request ``auto`` on a server whose
        default is not pays it once, in its first count."""
        if not _tp_in_api_server():
            # vLLM's engine core and workers build dummy inputs for profiling but never count
            # (numba: +130 MiB there)
            return
        cfg = self._tp_config()
        if AUTO in (cfg.prune_ratio, cfg.video_prune_ratio):
            if self._tp_auto_options().rule == "participation":
                kernel.warm()  # never raises: a pass numba cannot build leaves numpy counting

    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        token_plan = _request_plan.set(self._tp_resolve_plan(inputs.hf_processor_mm_kwargs))
        token = _prompt_text_ids.set(self._tp_text_ids(inputs.prompt))
        token_items = _item_text_ids.set(self._tp_item_texts(inputs))
        token_missing = _missing_items.set(None)
        token_plans = _item_plans.set(None)
        token_new = _new_plans.set(None)
        try:
            result = super().apply(inputs, *args, **kwargs)  # type: ignore[misc]
            plans = _item_plans.get() or {}
            request_plan = _request_plan.get()
        finally:
            _prompt_text_ids.reset(token)
            _item_text_ids.reset(token_items)
            _missing_items.reset(token_missing)
            _item_plans.reset(token_plans)
            _new_plans.reset(token_new)
            _request_plan.reset(token_plan)
        if request_plan is not None:
            self._tp_record(request_plan, plans)
        return result

    def _maybe_apply_prompt_updates(self, mm_items: Any, mm_res: Any) -> Any:
        """Read each item's plan off its placeholder content (cache hits included), at its
        place in this prompt."""
        plans: dict[str, list[ItemPlan | None]] = {}
        for modality, per_item in (mm_res.prompt_updates or {}).items():
            found = [next((u.content.tp_plan for u in updates
                           if getattr(u.content, "tp_plan", None) is not None), None)
                     for updates in per_item]
            plans[modality] = [None if p is None else ItemPlan(*p)._replace(index=i)
                               for i, p in enumerate(found)]
        _item_plans.set(plans)
        return super()._maybe_apply_prompt_updates(  # type: ignore[misc]
            mm_items=mm_items, mm_res=mm_res)

    def _tp_record(self, request: RequestPlan,
                   plans: Mapping[str, Sequence[ItemPlan | None]]) -> None:
        """Count this request's visual tokens and report them for the response field (exact:
        every keep-count is fixed by its plan). ``plans``: per modality, each item's plan from
        its placeholder content (:func:`_counted`), which vLLM's processor cache returns with
        every hit; None: not pruned (e.g. precomputed embeddings)."""
        if not metrics.enabled() or _profiling.get():
            return
        modalities = [m for m, per_item in plans.items() if m in MODALITIES and per_item]
        items = [p for m in modalities for p in plans[m] if p is not None]
        if not items:
            return
        ratios: dict[str, float | str] = {
            m: "auto" if request[m].auto else request[m].ratio for m in modalities}
        model_name = self.info.ctx.model_config.served_model_name
        metrics.record_request(model_name, request.method, items, ratios)
        response.note_plans(request.method, items, ratios, request.cap)

    def _tp_text_ids(self, prompt: Sequence[int] | str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        special = getattr(self, "_tp_special_ids", None)
        if special is None:
            tok = self.info.get_tokenizer()
            special = frozenset(getattr(tok, "all_special_ids", ()) or ())
            special |= frozenset(self._tp_media_token_ids())
            self._tp_special_ids = special
        ids = [int(t) for t in prompt if int(t) not in special]
        return tuple(ids[-MAX_TEXT_TOKENS:])

    def _tp_media_token_ids(self) -> set[int]:
        hf = self.info.get_hf_config()
        names = ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "image_token_index", "video_token_index")
        return {int(v) for n in names if isinstance(v := getattr(hf, n, None), int)}

    def _tp_item_texts(self, inputs: Any) -> dict[str, list[tuple[int, ...]]]:
        """Per modality, each item's scorer text: the text of its own chat message
        (:func:`vllm_tokenprune.cache_keys.message_text_ids`); the prompt's last text tokens
        when the prompt's placeholders cannot be matched to the items."""
        prompt = inputs.prompt
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        self._tp_text_ids(())  # fills the special-id cache
        media = self._tp_media_token_ids()
        boundaries = self._tp_special_ids - media
        hf = self.info.get_hf_config()
        out: dict[str, list[tuple[int, ...]]] = {}
        for modality, items in inputs.mm_data_items.items():
            count = items.get_count()
            token_id = None
            for name in (f"{modality}_token_id", f"{modality}_token_index"):
                if isinstance(value := getattr(hf, name, None), int):
                    token_id = value
                    break
            texts = None if token_id is None else message_text_ids(
                prompt, token_id, count, media, boundaries, MAX_TEXT_TOKENS)
            if texts is None:
                texts = [self._tp_text_ids(prompt)] * count
            out[modality] = texts
        return out

    def _tp_salt(self, request: RequestPlan, modality: str, index: int,
                 peers: Sequence[str] = ()) -> str | None:
        """The hash suffix of item ``index`` of ``modality`` (None: not pruned, vLLM's key).
        Beyond the selection's inputs, it carries what decided the count and is in no vLLM key
        (the server's ``auto`` options, ``low_detail_tokens``, its default cap) and, in a capped
        request, ``peers``: every item's own key, as the cap's split depends on all of them."""
        plan = request[modality]
        detail = request.detail(modality, index)
        if not plan.prunes and request.cap is None and detail is None:
            return None
        cfg = self._tp_config()
        text = None
        if plan.uses_text:
            texts = (_item_text_ids.get() or {}).get(plan.modality)
            text = texts[index] if texts is not None and index < len(texts) else ()
        budget: dict[str, Any] = {}
        if plan.auto and detail != "high":
            budget["auto"] = dataclasses.asdict(self._tp_auto_options())
        if detail is not None:
            budget.update(detail=detail, low=cfg.low_detail_tokens)
        if request.cap is not None:
            budget.update(cap=request.cap, peers=list(peers))
        return pruned_item_salt(__version__, plan.method, cfg.options_for(plan.method),
                                cfg.min_keep, text, budget or None)

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        if _profiling.get():
            return {m: [f"{h}{PROFILE_SALT}" for h in items] for m, items in hashes.items()}
        plan = self._tp_plan(inputs.hf_processor_mm_kwargs)
        peers = ([h for m in MODALITIES for h in hashes.get(m, ())]
                 if plan.cap is not None else [])
        out = {}
        for modality, items in hashes.items():
            salted = []
            for i, h in enumerate(items):
                salt = (self._tp_salt(plan, modality, i, peers) if modality in plan.modalities
                        else None)
                salted.append(h if salt is None else f"{h}-tp{salt}")
            out[modality] = salted
        return out

    def _get_cache_missing_items(self, cache: Any, mm_data_items: Any, mm_hashes: Any) -> Any:
        """vLLM's split of the items into cached and missing; a capped request with some items
        cached and some not is processed whole (the cap's split needs every item), its cached
        items then come back from the cache as they are (same keys, same split)."""
        is_cached, missing = super()._get_cache_missing_items(  # type: ignore[misc]
            cache, mm_data_items, mm_hashes)
        flags = [f for m in MODALITIES for f in is_cached.get(m, ())]
        request = _request_plan.get()
        if (request is not None and request.cap is not None and not _profiling.get()
                and any(flags) and not all(flags)):
            data = {}
            for modality, items in mm_data_items.items():
                if any(items[i] is None for i in range(items.get_count())):
                    return is_cached, missing  # items sent by uuid alone: vLLM's split
                data[modality] = [items[i] for i in range(items.get_count())]
            is_cached = {m: [False] * len(v) for m, v in is_cached.items()}
            missing = self.info.parse_mm_data(data, validate=False)
        return is_cached, missing


    def _get_cache_missing_processor_kwargs(self, inputs: Any, mm_is_cached: Any) -> Any:
        """Remember which items the processor cache missed: they are the ones processed now,
        and each needs its own scorer text."""
        _missing_items.set({m: [i for i, cached in enumerate(flags) if not cached]
                            for m, flags in mm_is_cached.items()})
        return super()._get_cache_missing_processor_kwargs(  # type: ignore[misc]
            inputs, mm_is_cached)

    def _tp_max_item_tokens(self) -> dict[str, int]:
        """The largest item per modality vLLM profiles the encoder with (its
        ``mm_max_toks_per_item``, from the same ``get_mm_max_tokens_per_item`` call)."""
        cached = getattr(self, "_tp_max_tokens", None)
        if cached is None:
            cached = {}
            try:
                info = self.info
                limits = info.allowed_mm_limits
                counts = {m: 1 for m in info.supported_mm_limits if limits.get(m, 0) > 0}
                got = info.get_mm_max_tokens_per_item(
                    seq_len=info.ctx.model_config.max_model_len, mm_counts=counts)
                cached = {m: int(v) for m, v in (got or {}).items()}
            except Exception:  # noqa: BLE001 - no bound known: vLLM's own checks only
                cached = {}
            self._tp_max_tokens = cached
        return cached

    def _tp_check_plan(self, plan: ItemPlan) -> None:
        """Refuse (ValueError: a 400 for this request) an item the worker cannot serve safely:
        a pruned item larger than the profiled encoder batch or with a grid past the position
        encoding (:meth:`_tp_check_item`), or one a greedy method would keep too many tokens
        of (:meth:`_tp_check_greedy`)."""
        if plan.ratio > 0.0 or plan.num_keep < plan.num_tokens:
            self._tp_check_item(plan.modality, plan.layout, self._tp_layout_charge(plan.layout))
        self._tp_check_greedy(plan)

    def _tp_check_item(self, modality: str, layout: ItemLayout, charge: int) -> None:
        """vLLM refuses an item with more embeddings than its encoder cache holds (at least the
        largest profiled item of any modality, ``compute_mm_encoder_budget``); a pruned item's
        prompt only shows its kept tokens, so the same bound is applied here to its unpruned
        count (the part of vLLM's bound the processor can see)."""
        sizes = self._tp_max_item_tokens()
        bound = max(sizes.values()) if sizes else None
        if bound is not None and charge > bound:
            raise ValueError(
                f"vllm-tokenprune: this {modality} has {charge} tokens before pruning, more "
                f"than the largest media item the server's encoder was profiled with ({bound}); "
                f"send a smaller {modality} (or raise --max-model-len on the server)")
        if layout.grid is not None and max(layout.grid) >= 256 * 256:
            raise ValueError(
                f"vllm-tokenprune: this {modality}'s token grid {layout.grid} is too large "
                "for pruning (positions must stay below 65536)")

    def _tp_check_greedy(self, plan: ItemPlan) -> None:
        """An item a greedy method would need more than ``token_prune.max_greedy_keep``
        sequential steps for: their cost grows with the keep-count, and one such item stalls
        every request of the engine's batch."""
        spec = get_method(plan.method)
        if spec.stage != INPUT or not spec.greedy:
            return
        cap = self._tp_config().max_greedy_keep
        k, n, modality = plan.num_keep, plan.num_tokens, plan.modality
        if cap < k < n:
            field = "video_prune_ratio" if modality == "video" else "prune_ratio"
            raise ValueError(
                f"{field}: {plan.method} would keep {k} of this {modality}'s {n} tokens, more "
                f"than this server allows for a greedy method (token_prune.max_greedy_keep = "
                f"{cap}); send a higher {field}, a smaller {modality}, or a prune_method such "
                "as lrcp")

    def _tp_layout_charge(self, layout: ItemLayout) -> int:
        """What vLLM charges the unpruned item (its full placeholder count)."""
        return layout.num_tokens

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        """Run the model's own HF processing without our request fields, then add the per-item
        pruning fields to its output (only for the items processed now: cached items keep
        theirs, and the cache key includes the request fields)."""
        self._tp_check_embeds(mm_items, hf_kwargs)
        clean = {k: v for k, v in hf_kwargs.items() if k not in SEALED_FIELDS}
        out = super()._apply_hf_processor_main(mm_items, clean)  # type: ignore[misc]
        self._tp_add_fields(out, self._tp_plan(hf_kwargs))
        return out

    def _tp_check_embeds(self, mm_items: Any, mm_kwargs: Mapping[str, object]) -> None:
        """Refuse a non-zero ratio for precomputed embedding items (``image_embeds``) on
        families that serve them unpruned (:attr:`tp_prunes_embeds` False), rather than ignore
        it: a ValueError naming ``prune_ratio``, which vLLM answers with a 400."""
        if self.tp_prunes_embeds:
            return
        plan = self._tp_plan(mm_kwargs)
        for modality, items in mm_items.items():
            if not items or not items.get_passthrough_data():
                continue
            if modality in plan.modalities and plan[modality].prunes:
                field = plan[modality].field
                raise ValueError(
                    f"{field}: precomputed {modality} embeddings ({modality}_embeds) are not "
                    f"pruned by {type(self).__name__.removesuffix('MultiModalProcessor')}; "
                    f"send {field}=0 with them, or send the {modality} itself"
                )

    def _tp_add_fields(self, out: Any, request: RequestPlan) -> None:
        """Plan each item processed now (the processor cache's misses) and add its params row
        (and its scorer text) to the HF output."""
        cfg = self._tp_config()
        prompt_text = _prompt_text_ids.get() or ()
        item_texts = _item_text_ids.get() or {}
        missing = _missing_items.get()
        found: dict[str, tuple[list[ItemLayout], list[int]]] = {}
        for modality in MODALITIES:
            layouts = self._tp_item_layouts(modality, out)
            if layouts is None:
                continue
            # item j processed now is the prompt's item original[j] (cache misses only)
            original = (missing or {}).get(modality, list(range(len(layouts))))
            found[modality] = (layouts, [original[j] if j < len(original) else j
                                         for j in range(len(layouts))])
        counts = iter(self._tp_counts(out, request, found))
        new_plans: dict[str, list[ItemPlan]] = {}
        for modality, (layouts, original) in found.items():
            plans = [ItemPlan.plan(request[modality], original[j], lay, cfg.min_keep,
                                   next(counts)) for j, lay in enumerate(layouts)]
            new_plans[modality] = plans
            for plan in plans:
                self._tp_check_plan(plan)
            rows = [plan.row() for plan in plans]
            width = max((len(r) for r in rows), default=PARAMS_HEAD)
            out[params_key(modality)] = torch.tensor(rows, dtype=torch.long).reshape(-1, width)
            if _profiling.get():
                out[profile_key(modality)] = torch.ones(len(rows), dtype=torch.long)
            if request[modality].uses_text:
                texts = item_texts.get(modality)
                ids = torch.full((len(rows), MAX_TEXT_TOKENS), -1, dtype=torch.long)
                for j in range(len(rows)):
                    k = original[j] if j < len(original) else j
                    text = texts[k] if texts is not None and k < len(texts) else prompt_text
                    if text:
                        ids[j, : len(text)] = torch.tensor(text, dtype=torch.long)
                out[text_key(modality)] = ids
        _new_plans.set(new_plans)

    def _tp_counts(self, out: Any, request: RequestPlan,
                   found: Mapping[str, tuple[list[ItemLayout], list[int]]]
                   ) -> list[tuple[int, str]] | list[None]:
        """``(num_keep, why)`` of every item processed now (:func:`item_counts`), modality by
        modality; None each (the ratio's count) for vLLM's profiling dummies."""
        total = sum(len(lays) for lays, _ in found.values())
        if _profiling.get() or not request.budgeted():
            return [None] * total
        cfg = self._tp_config()
        if request.cap is not None and total and request.cap < total * cfg.min_keep:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"max_visual_tokens: {request.cap} is below what the request's {total} media "
                f"items keep at least (token_prune.min_keep = {cfg.min_keep} each)",
                parameter="max_visual_tokens")
        items = []
        for modality, (layouts, original) in found.items():
            for j, lay in enumerate(layouts):
                estimate = None
                if request[modality].auto and request.detail(modality, original[j]) != "high":
                    estimate = self._tp_auto_keep(out, modality, j, lay.num_tokens)
                items.append((modality, original[j], lay.num_tokens, estimate))
        return item_counts(request, items, cfg.min_keep)

    def _tp_auto_keep(self, out: Any, modality: str, index: int, num_tokens: int) -> int:
        """``auto``'s count for item ``index`` of the HF output (:mod:`vllm_tokenprune.budget`:
        the spectral rank of its pixels at the language model's token granularity)."""
        try:  # the counter is made on first use: what it reads of the processor counts too
            counter, min_keep = self._tp_auto_counter(modality)
            return counter.count(out, index, num_tokens, min_keep).num_keep
        except (KeyError, ValueError) as e:
            field = "video_prune_ratio" if modality == "video" else "prune_ratio"
            raise ValueError(f"{field}: 'auto' cannot read this {modality}'s pixels on "
                             f"{type(self).__name__}: {e}") from None

    def _tp_auto_counter(self, modality: str) -> tuple[AutoCounter, int]:
        """The :class:`~vllm_tokenprune.budget.hf.AutoCounter` of ``modality`` (the HF
        processor, the patch size, the options, the factor to pixel units; it keeps the
        readers of the layouts met) and ``min_keep``. Fixed for the server's life, so made once
        per modality: looked up on every request they cost 0.1 ms, cold after the processor
        (``docs/budgets.md``, "Cost")."""
        kept: dict[str, tuple[AutoCounter, int]] = self.__dict__.setdefault(
            "_tp_auto_kept", {})
        found = kept.get(modality)
        if found is None:
            hf = self.info.get_hf_processor()
            proc = getattr(hf, f"{modality}_processor", None) or hf.image_processor
            patch = int(getattr(self.info.get_hf_config().vision_config, "patch_size", 14))
            # vLLM may normalize the pixels on the device (mm_device_do_normalize): then they
            # are raw here, and the processor ran with do_rescale / do_normalize False
            merged = self.info.ctx.get_merged_mm_kwargs({})
            scale = pixel_scale(proc, do_rescale=merged.get("do_rescale"),
                                do_normalize=merged.get("do_normalize"))
            found = kept[modality] = (
                AutoCounter(proc, self._tp_auto_options(), patch, modality, scale),
                self._tp_config().min_keep)
        return found

    def _tp_fields_config(self, hf_inputs: Mapping[str, object]) -> dict[str, Any]:
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = {}
        for modality in ("image", "video"):
            for key in (params_key(modality), text_key(modality), profile_key(modality)):
                if key in hf_inputs:
                    fields[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        """The model's own fields, its pixel fields kept on the host (both runners then leave
        them there: ``group_and_batch_mm_kwargs`` moves only the other fields to the device),
        plus the pruning fields."""
        from dataclasses import replace

        base = dict(super()._get_mm_fields_config(  # type: ignore[misc]
            hf_inputs, hf_processor_mm_kwargs))
        for key in STAGED_FIELDS:
            if key in base:
                base[key] = replace(base[key], field=replace(base[key].field, keep_on_cpu=True))
        return dict(**base, **self._tp_fields_config(hf_inputs))

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Any:
        """The model's own placeholder replacement, cut to the item's keep-count."""
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )
        return [self._tp_wrap_update(u, out_mm_kwargs, hf_processor_mm_kwargs) for u in updates]

    def _tp_wrap_update(self, update: Any, out_mm_kwargs: Any,
                        mm_kwargs: Mapping[str, object]) -> Any:
        from dataclasses import replace

        modality = update.modality
        original = update.replacement

        def pruned(item_idx: int, _orig: Callable[[int], Any] = original) -> Any:
            full = _orig(item_idx) if callable(_orig) else _orig
            item = out_mm_kwargs[modality][item_idx]
            if params_key(modality) not in item:  # e.g. precomputed embeddings: not pruned
                return full
            row = item[params_key(modality)].data.tolist()
            plan = ItemPlan.from_row(self._tp_plan(mm_kwargs)[modality], item_idx, row)
            made = (_new_plans.get() or {}).get(modality) or ()
            if item_idx < len(made) and made[item_idx].row() == row:
                plan = made[item_idx]  # the same count, with what decided it
            if plan.stage == LAYER:  # acts inside the LM: the input keeps every token
                return _counted(full, plan)
            tokens = [int(t) for t in getattr(full, "full", full)]
            return _counted(self._tp_pruned_tokens(modality, tokens, plan), plan)

        return replace(update, replacement=pruned)


