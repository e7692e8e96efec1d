"""The model's hooks of visual-token pruning: what vLLM's model runner calls on a TokenPrune
model (runs in the worker, inside vLLM's batched encoder step and forward).

After the vision encoder produced each item's embeddings, :meth:`TokenPruneModelMixin._tp_select`
scores every item of the batch (one batched scorer call per input-side method) and the
architecture keeps the selected rows in their original order. Architectures with 1-D RoPE
(LLaVA) need nothing more: kept tokens take contiguous positions. For M-RoPE (Qwen-VL) the kept
rows also carry their unpruned ``(t, h, w)`` positions, appended as extra channels (:mod:`.wire`),
as vLLM's EVS video pruning does, and ``recompute_mrope_positions`` puts them in place
(:mod:`.positions`). Items of a layer-stage method (the registry's answer, ``alvts``) keep every
row; a mixin of the families that serve the method handles them (:meth:`_tp_layer_rows`,
:meth:`_tp_embed_input_ids`; :mod:`vllm_tokenprune.alvts.model`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from vllm_tokenprune._vllm_internals import check_mrope_runner, check_pipeline_parallel
from vllm_tokenprune.config import TokenPruneConfig, config_from_hf_config
from vllm_tokenprune.log import init_logger
from vllm_tokenprune.method_table import check_worker_methods
from vllm_tokenprune.metrics import worker as worker_metrics
from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models.encoder_budget import EncoderBudgetMixin
from vllm_tokenprune.models.mrope import MropeRowsMixin
from vllm_tokenprune.models.wire import (
    PARAMS_HEAD,
    POS_CHANNELS,
    ROUTE_CHANNELS,
    Grid,
    ItemParams,
)
from vllm_tokenprune.runtime import check_request_bridge
from vllm_tokenprune.scoring import INPUT, LAYER, get_method, select_tokens_batch

logger = init_logger(__name__)


def rows_of(value: Any, items: range) -> Any:
    """The rows of a batched per-item field (tensor or list; None stays None) for ``items``."""
    if value is None or (items.start == 0 and len(value) == items.stop):
        return value
    return value[items.start: items.stop]


class TokenPruneModelMixin(MropeRowsMixin, EncoderBudgetMixin):
    """Mix into a vLLM multimodal model class, before it in the MRO.

    ``__init__`` runs the model's own and then :meth:`_tp_setup`. Subclasses implement
    ``embed_multimodal`` with :meth:`_tp_select` and, for M-RoPE models, :meth:`_tp_prune`
    and ``recompute_mrope_positions`` (:meth:`_tp_recompute_mrope_positions`; both in
    :mod:`.mrope`). A family that
    serves a layer-stage method mixes that method's model mixin in before this one (it extends
    :meth:`_tp_pre_init`, :meth:`_tp_setup`, :meth:`_tp_embed_input_ids` and
    :meth:`_tp_layer_rows`, and lists the method in :attr:`tp_layer_methods`).
    """

    tp_config: TokenPruneConfig
    #: The LM uses M-RoPE: kept rows carry their unpruned positions (POS_CHANNELS extra
    #: channels) until ``recompute_mrope_positions`` strips them. False for 1-D RoPE (LLaVA).
    tp_mrope: ClassVar[bool] = True
    #: The layer-stage methods this family serves (their mixins add them).
    tp_layer_methods: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, vllm_config: Any = None, prefix: str = "", **kwargs: Any) -> None:
        # vLLM passes (vllm_config=, prefix=) to classes whose __init__ names them.
        if vllm_config is None:  # not built by vLLM (unit tests of the helpers)
            super().__init__(**kwargs)
            return
        self._tp_pre_init(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tp_setup(vllm_config)

    def _tp_pre_init(self, vllm_config: Any) -> None:
        """Before the model's own ``__init__``: refuse EVS, and for M-RoPE families pipeline
        parallelism and runners that would not recompute positions; switch multimodal
        pruning on."""
        if self.tp_mrope:
            check_pipeline_parallel(vllm_config)
            check_mrope_runner(vllm_config)
        cfg = config_from_hf_config(vllm_config.model_config.hf_config)
        unserved = [m for m in cfg.layer_methods() if m not in self.tp_layer_methods]
        if unserved:
            raise ValueError(
                f"vllm-tokenprune: token_prune enables {unserved[0]!r} (method or "
                f"allowed_methods), which {type(self).__name__} does not support (it acts "
                f"inside the language model, and this family has no integration for it); "
                f"remove {unserved[0]!r} from token_prune")
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and (mm_config.video_pruning_rate or 0) > 0:
            raise ValueError(
                "vllm-tokenprune: --video-pruning-rate (vLLM's EVS) cannot be combined with a "
                "TokenPrune architecture; set token_prune.video_prune_ratio instead."
            )
        # vLLM's model runner calls `recompute_mrope_positions` only when the multimodal config
        # says pruning is enabled (its EVS switch is `video_pruning_rate`). Pruning is always
        # possible on a TokenPrune model (per request), so switch it on for this instance,
        # before the model builds its layers (Qwen3-VL sizes its M-RoPE cache from it).
        if self.tp_mrope and mm_config is not None:
            object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
        self._tp_disable_encoder_cudagraphs(vllm_config)

    def _tp_disable_encoder_cudagraphs(self, vllm_config: Any) -> None:
        """Switch vLLM's encoder CUDA graphs off for this model, saying so once.

        With ``compilation_config.cudagraph_mm_encoder`` on, both model runners run the vision
        tower through ``EncoderCudaGraphManager`` and never call ``embed_multimodal``, where
        every item is pruned: the rows would arrive unpruned (more rows than the prompt's
        placeholders) and, for M-RoPE models, without their position channels. The graph path
        is chosen per modality for a whole batch, not per item, so it cannot be kept even for
        items at ratio 0 while other items of the same batch are pruned. Both runners read the
        flag only after the model is built (V1: ``_create_encoder_cudagraph_manager``; V2:
        ``ModelState.__init__``), so clearing it here means no encoder graphs are captured at
        all (no capture time, no graph memory). ``get_encoder_cudagraph_config`` of the Qwen
        family also reports no graph modality, in case a runner builds a manager anyway.
        """
        from vllm.model_executor.models.interfaces import supports_encoder_cudagraph

        compilation = getattr(vllm_config, "compilation_config", None)
        if compilation is None or not getattr(compilation, "cudagraph_mm_encoder", False):
            return
        compilation.cudagraph_mm_encoder = False
        if supports_encoder_cudagraph(type(self)):
            logger.warning(
                "vllm-tokenprune: encoder CUDA graphs (compilation_config.cudagraph_mm_encoder) "
                "are switched off for %s, for images and videos: the graph path bypasses "
                "embed_multimodal, where visual tokens are pruned. The language model's CUDA "
                "graphs are not affected.", type(self).__name__)

    def _tp_setup(self, vllm_config: Any) -> None:
        model_config = vllm_config.model_config
        self.tp_config = config_from_hf_config(model_config.hf_config)
        check_request_bridge()
        check_worker_methods(self.tp_config)
        worker_metrics.init_worker(model_config.served_model_name)
        if self.tp_mrope:
            self.is_multimodal_pruning_enabled = True
        self._tp_setup_encoder_cap(vllm_config)

    def _tp_embed_width(self) -> int:
        """Width of a media embedding row as the LM's ``embed_input_ids`` expects it."""
        return int(self.config.get_text_config().hidden_size)  # type: ignore[attr-defined]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None,
                        **kwargs: Any) -> torch.Tensor:
        """The LM's own ``embed_input_ids`` after two guards that never raise (a fallback,
        counted, instead of a dead engine): rows still carrying position channels mean the
        model runner did not call ``recompute_mrope_positions`` (refused at start-up by
        :func:`.._vllm_internals.check_mrope_runner`; reaching this is a vLLM contract change):
        the channels are stripped and the media keep the prompt's provisional positions; and a
        step whose media rows do not fill its placeholders exactly (vLLM would raise) gets its
        rows cut or zero-padded to the placeholder count."""
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            multimodal_embeddings = self._tp_strip_unrecomputed(list(multimodal_embeddings))
            multimodal_embeddings = self._tp_fit_rows(multimodal_embeddings,
                                                      kwargs.get("is_multimodal"))
        return self._tp_embed_input_ids(input_ids, multimodal_embeddings, **kwargs)

    def _tp_embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any,
                            **kwargs: Any) -> torch.Tensor:
        """vLLM's ``embed_input_ids`` on the checked rows. A layer-stage method's mixin takes
        its channels off the rows here first."""
        return super().embed_input_ids(  # type: ignore[misc]
            input_ids, multimodal_embeddings, **kwargs
        )

    def _tp_layer_rows(self, emb: torch.Tensor, p: ItemParams,
                       through: torch.Tensor | None = None, modality: str = "image"
                       ) -> torch.Tensor:
        """An item of a layer-stage method: every row, marked for the layers (``through``:
        host bool mask of rows that always go through, e.g. LLaVA-NeXT's image newlines). A
        family without that method's mixin never gets such an item (refused at start-up);
        should one arrive, it goes through every layer, counted."""
        fallbacks.report_fallback(p.method, fallbacks.LAYOUT,
                                  f"{type(self).__name__} has no integration for {p.method}",
                                  "its tokens go through every layer")
        return emb

    def _tp_strip_unrecomputed(self, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.tp_mrope:
            return embeds
        width = self._tp_embed_width()
        extra = [e.shape[-1] - width for e in embeds]
        if not any(x in (POS_CHANNELS, ROUTE_CHANNELS + POS_CHANNELS) for x in extra):
            return embeds
        fallbacks.report_fallback(
            "-", fallbacks.NO_RECOMPUTE,
            "the model runner did not call recompute_mrope_positions for pruned media rows (a "
            "vLLM runner contract listed in vllm_tokenprune/_vllm_internals.py changed)",
            "its tokens keep the prompt's provisional positions")
        return [e[:, :-POS_CHANNELS] if x in (POS_CHANNELS, ROUTE_CHANNELS + POS_CHANNELS)
                else e for e, x in zip(embeds, extra, strict=True)]

    def _tp_fit_rows(self, embeds: list[torch.Tensor], is_multimodal: Any
                     ) -> list[torch.Tensor]:
        """Rows cut or zero-padded (last item) to the step's placeholder count, when
        ``is_multimodal`` is a host tensor (as both runners pass it: reading it is no sync)."""
        if not isinstance(is_multimodal, torch.Tensor) or is_multimodal.device.type != "cpu":
            return embeds
        expected = int(is_multimodal.sum())
        have = sum(int(e.shape[0]) for e in embeds)
        if have == expected:
            return embeds
        fallbacks.report_fallback("-", fallbacks.COUNT_MISMATCH,
                              f"this step has {have} media rows for {expected} placeholders",
                              "its rows are cut or zero-padded to fit")
        out, left = [], expected
        for e in embeds:
            take = min(int(e.shape[0]), left)
            out.append(e[:take])
            left -= take
        if left > 0:
            last = out[-1]
            out[-1] = torch.cat([last, last.new_zeros(left, last.shape[1])])
        return out

    def _tp_row_charge(self, row: list[int]) -> int:
        """What vLLM would charge an item unpruned, from its raw params row (never raises)."""
        try:
            return self._tp_charge(ItemParams.from_row(row))
        except (ValueError, IndexError):
            return max(int(row[2]), 0) if len(row) > 2 else 0

    def _tp_text_embeds(self, ids_row: torch.Tensor, device: torch.device) -> torch.Tensor:
        ids = ids_row[ids_row >= 0].to(device)
        return self.get_language_model().embed_input_ids(ids)  # type: ignore[attr-defined]

    def _tp_params(self, params: torch.Tensor | None, sizes: Sequence[int],
                   grids: Sequence[Grid | None] | None = None) -> list[ItemParams]:
        """The batch's params rows (CPU tensor: no device sync). Without them (e.g. dummy
        profiling inputs from an older cache entry) every item keeps all of its tokens. A row
        the worker cannot use (unknown method, counts out of range) or that does not match the
        encoder's output keeps ``num_keep`` rows (clamped to what exists) by the uniform
        fallback, counted, never an exception."""
        grids = grids or [None] * len(sizes)
        if params is None:
            method = self.tp_config.method
            stage = get_method(method).stage
            return [ItemParams(n, method, n, g, (), stage)
                    for n, g in zip(sizes, grids, strict=True)]
        rows = params.reshape(len(sizes), -1).tolist()
        out = []
        for row, n, grid in zip(rows, sizes, grids, strict=True):
            if row and faults.fault_for_test(faults.FAULT_PARAMS, int(row[0])):
                row = [row[0], -1, *row[2:]]  # an unknown method id
            try:
                p = ItemParams.from_row(row)
            except (ValueError, IndexError) as e:
                keep = min(max(int(row[0]), 0), n) if row else n
                fallbacks.report_fallback("-", fallbacks.BAD_PARAMS, f"invalid params row: {e}")
                out.append(ItemParams(keep, fallbacks.FALLBACK_METHOD, n, grid,
                                      tuple(int(v) for v in row[PARAMS_HEAD:])))
                continue
            if p.num_tokens != n:
                fallbacks.report_fallback(
                    p.method, fallbacks.COUNT_MISMATCH,
                    f"the encoder produced {n} tokens for an item the processor counted "
                    f"{p.num_tokens} for")
                # keep exactly num_keep of the n rows, evenly spread (FALLBACK: no scorer)
                p = ItemParams(p.num_keep, fallbacks.FALLBACK_METHOD, n, grid, p.extra)
            out.append(p)
        return out

    def _tp_select(
        self,
        modality: str,
        feats: Sequence[torch.Tensor],
        params: Sequence[ItemParams],
        text_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor | None]:
        """Each item's kept row indices (ascending; None: it keeps all of its tokens).

        ``feats`` are what the scorer sees (N_i, D) per item; ``params[i].grid`` their layout.
        One batched scorer call per method in the batch.
        """
        keep_idx: list[torch.Tensor | None] = [None] * len(feats)
        feats = faults.poison_for_test(feats, [p.num_tokens for p in params])
        if self._tp_sweep_now:
            self._tp_profile_sweep(feats, params)
        by_method: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if p.method == fallbacks.FALLBACK_METHOD:
                keep_idx[i] = fallbacks.uniform_fallback(feats[i].shape[0], p.num_keep,
                                                         feats[i].device)
            elif p.stage != INPUT:
                continue  # acts inside the LM (:meth:`_tp_layer_rows`): the input keeps all
            elif p.num_keep != feats[i].shape[0]:
                by_method[p.method].append(i)
        for method, items in by_method.items():
            try:
                with worker_metrics.time_scorer(method, modality, feats[items[0]].device):
                    selected = self._tp_score(method, feats, params, items, text_ids)
            except Exception:  # noqa: BLE001 - retried item by item below
                selected = [self._tp_score_or_fallback(method, feats, params, i, text_ids)
                            for i in items]
            for i, idx in zip(items, selected, strict=True):
                keep_idx[i] = idx
        return keep_idx

    def _tp_score(self, method: str, feats: Sequence[torch.Tensor],
                  params: Sequence[ItemParams], items: Sequence[int],
                  text_ids: torch.Tensor | None) -> list[torch.Tensor]:
        """One batched scorer call for ``items`` (all scored with ``method``)."""
        text = None
        if get_method(method).uses_text and text_ids is not None:
            text = [self._tp_text_embeds(text_ids[i], feats[i].device) for i in items]
            text = [t if t.shape[0] > 0 else None for t in text]
        selected = select_tokens_batch(
            [feats[i] for i in items],
            [params[i].num_keep for i in items],
            method,
            text_embeds=text,
            grids=[params[i].grid for i in items],
            **self.tp_config.options_for(method),
        )
        for i, idx in zip(items, selected, strict=True):
            if idx.shape != (params[i].num_keep,):
                raise RuntimeError(f"{method} returned {tuple(idx.shape)} indices, expected "
                                   f"{params[i].num_keep}")
        return selected

    def _tp_score_or_fallback(self, method: str, feats: Sequence[torch.Tensor],
                              params: Sequence[ItemParams], i: int,
                              text_ids: torch.Tensor | None) -> torch.Tensor:
        """One item alone; if scoring it fails, a uniform subset of exactly num_keep rows."""
        try:
            return self._tp_score(method, feats, params, [i], text_ids)[0]
        except Exception as e:  # noqa: BLE001 - a request's media must not kill the engine
            fallbacks.report_fallback(method, fallbacks.classify(e), str(e))
            return fallbacks.uniform_fallback(feats[i].shape[0], params[i].num_keep,
                                              feats[i].device)

    def _tp_score_view(self, emb: torch.Tensor) -> torch.Tensor:
        """The part of an item's embedding rows the scorer sees (Qwen3-VL: not the deepstack
        copies appended to each row)."""
        return emb

    def _tp_keep_rows(
        self,
        modality: str,
        embeds: Sequence[torch.Tensor],
        params: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """1-D RoPE models: each item's kept rows, in order (contiguous positions)."""
        embeds = faults.shorten_for_test(embeds, params)
        items = self._tp_params(params, [e.shape[0] for e in embeds])
        keep = self._tp_select(modality, [self._tp_score_view(e) for e in embeds], items,
                               text_ids)
        return tuple(
            self._tp_layer_rows(e, p, modality=modality) if p.stage == LAYER
            else e if idx is None else e.index_select(0, idx)
            for e, idx, p in zip(embeds, keep, items, strict=True)
        )
