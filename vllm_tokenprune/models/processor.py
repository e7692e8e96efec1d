"""The processor side of visual-token pruning (runs where vLLM preprocesses requests, the API
server).

* resolves each media item's ``(prune_ratio, method)`` from the request's
  ``mm_processor_kwargs`` (put there by the endpoint plugin) or the server's ``token_prune``
  block, and computes the keep-count with :func:`vllm_tokenprune.num_kept` *before* the encoder
  runs: the prompt gets exactly the placeholder tokens of the pruned item;
* carries one params row per item to the model (:mod:`.wire`);
* for text-conditioned methods, carries the prompt's text token ids too and mixes them into the
  item's cache hash, so the encoder cache never serves a selection made for another prompt.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vllm_tokenprune.config import (
    REQUEST_FIELDS,
    TokenPruneConfig,
    config_from_hf_config,
    parse_request_fields,
)
from vllm_tokenprune.models.wire import (
    METHOD_IDS,
    PARAMS_HEAD,
    Grid,
    ItemLayout,
    ItemParams,
    params_key,
    text_key,
)
from vllm_tokenprune.scoring import get_method, num_kept

#: Items whose token counts the processor remembers for metrics of processor-cache hits.
_SEEN_ITEMS = 65536
#: Longest prompt text (in tokens, the last ones) handed to text-conditioned scorers.
MAX_TEXT_TOKENS = 256

_prompt_text_ids: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "tokenprune_prompt_text_ids", default=None
)

class TokenPruneProcessorMixin:
    """Mix into a ``BaseMultiModalProcessor`` subclass, before the vLLM class in the MRO.

    Per-architecture hooks: :meth:`_tp_item_layouts` (by default from ``<modality>_grid_thw``
    through :meth:`_tp_grid`) and :meth:`_tp_pruned_tokens` (by default the model's own
    placeholder replacement, one repeated token, cut to the keep-count).
    """

    info: Any

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

    def _tp_pruned_tokens(self, modality: str, full: list[int], params: ItemParams) -> list[int]:
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
            self._tp_cfg = cfg
        return cfg

    def _tp_resolve(self, mm_kwargs: Mapping[str, object], modality: str) -> tuple[float, str]:
        """(ratio, method) for items of ``modality`` under these processor kwargs."""
        cfg = self._tp_config()
        fields = parse_request_fields(
            {k: v for k, v in mm_kwargs.items() if k in REQUEST_FIELDS}, cfg
        )
        method = str(fields.get("prune_method", cfg.method))
        ratio = fields.get("prune_ratio")
        if modality == "video" and "video_prune_ratio" in fields:
            ratio = fields["video_prune_ratio"]
        if ratio is None:
            ratio = cfg.ratio_for(modality)
        return float(ratio), method

    # -- vLLM hooks
    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        token = _prompt_text_ids.set(self._tp_text_ids(inputs.prompt))
        try:
            result = super().apply(inputs, *args, **kwargs)  # type: ignore[misc]
        finally:
            _prompt_text_ids.reset(token)
        self._tp_record(result, inputs.hf_processor_mm_kwargs)
        return result

    def _tp_record(self, result: Any, mm_kwargs: Mapping[str, object]) -> None:
        """Count this request's visual tokens (exact: the keep-counts are fixed here).

        Items served from vLLM's processor cache come back without their data (``None``), so
        each item's (method, tokens, kept) is remembered by its cache hash when first seen.
        """
        from vllm_tokenprune import metrics, response

        if metrics._frontend is None:
            return
        seen = getattr(self, "_tp_seen", None)
        if seen is None:
            seen = self._tp_seen = OrderedDict()
        items = []
        ratios = {}
        for modality, modality_items in result["mm_kwargs"].items():
            if modality not in ("image", "video") or not modality_items:
                continue
            ratios[modality], _ = self._tp_resolve(mm_kwargs, modality)
            hashes = result["mm_hashes"].get(modality, [])
            for i, item in enumerate(modality_items):
                key = hashes[i] if i < len(hashes) else None
                if item is not None:
                    if params_key(modality) not in item:
                        continue
                    p = ItemParams.from_row(item[params_key(modality)].data.tolist())
                    info = (p.method, p.num_tokens, p.num_keep)
                    if key is not None:
                        seen[key] = info
                        if len(seen) > _SEEN_ITEMS:
                            seen.popitem(last=False)
                else:
                    info = seen.get(key)
                    if info is None:
                        continue
                    seen.move_to_end(key)
                items.append((modality, *info))
        if items:
            _, method = self._tp_resolve(mm_kwargs, "image")
            model_name = self.info.ctx.model_config.served_model_name
            metrics.record_request(model_name, method, items, ratios)
            response.note_request(method, items, ratios)

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

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        text_ids = _prompt_text_ids.get()
        out = {}
        for modality, items in hashes.items():
            _, method = self._tp_resolve(inputs.hf_processor_mm_kwargs, modality)
            if get_method(method).uses_text and text_ids is not None:
                salt = hashlib.sha256(repr(text_ids).encode()).hexdigest()[:32]
                items = [f"{h}-tp{salt}" for h in items]
            out[modality] = items
        return out

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        """Run the model's own HF processing without our request fields, then add the per-item
        pruning fields to its output (only for the items processed now: cached items keep
        theirs, and the cache key includes the request fields)."""
        clean = {k: v for k, v in hf_kwargs.items() if k not in REQUEST_FIELDS}
        out = super()._apply_hf_processor_main(mm_items, clean)  # type: ignore[misc]
        self._tp_add_fields(out, hf_kwargs)
        return out

    def _tp_add_fields(self, out: Any, mm_kwargs: Mapping[str, object]) -> None:
        cfg = self._tp_config()
        text_ids = _prompt_text_ids.get() or ()
        for modality in ("image", "video"):
            layouts = self._tp_item_layouts(modality, out)
            if layouts is None:
                continue
            ratio, method = self._tp_resolve(mm_kwargs, modality)
            rows = [
                lay.row(num_kept(lay.num_tokens, ratio, cfg.min_keep), METHOD_IDS[method])
                for lay in layouts
            ]
            width = max((len(r) for r in rows), default=PARAMS_HEAD)
            out[params_key(modality)] = torch.tensor(rows, dtype=torch.long).reshape(-1, width)
            if get_method(method).uses_text:
                ids = torch.full((len(rows), MAX_TEXT_TOKENS), -1, dtype=torch.long)
                if text_ids:
                    ids[:, : len(text_ids)] = torch.tensor(text_ids, dtype=torch.long)
                out[text_key(modality)] = ids

    def _tp_fields_config(self, hf_inputs: Mapping[str, object]) -> dict[str, Any]:
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = {}
        for modality in ("image", "video"):
            for key in (params_key(modality), text_key(modality)):
                if key in hf_inputs:
                    fields[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        base = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)  # type: ignore[misc]
        return dict(**base, **self._tp_fields_config(hf_inputs))

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Any:
        """The model's own placeholder replacement, cut to the item's keep-count."""
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )
        return [self._tp_wrap_update(u, out_mm_kwargs) for u in updates]

    def _tp_wrap_update(self, update: Any, out_mm_kwargs: Any) -> Any:
        from dataclasses import replace

        modality = update.modality
        original = update.replacement

        def pruned(item_idx: int, _orig: Callable[[int], Any] = original) -> Any:
            full = _orig(item_idx) if callable(_orig) else _orig
            item = out_mm_kwargs[modality][item_idx]
            if params_key(modality) not in item:  # e.g. precomputed embeddings: not pruned
                return full
            params = ItemParams.from_row(item[params_key(modality)].data.tolist())
            tokens = [int(t) for t in getattr(full, "full", full)]
            return self._tp_pruned_tokens(modality, tokens, params)

        return replace(update, replacement=pruned)


