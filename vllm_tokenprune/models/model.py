"""The model side of visual-token pruning (runs in the worker, inside vLLM's batched encoder
step).

After the vision encoder produced each item's embeddings, :meth:`TokenPruneModelMixin._tp_select`
scores every item of the batch (one batched scorer call per method) and the architecture keeps
the selected rows in their original order. Architectures with 1-D RoPE (LLaVA) need nothing
more: kept tokens take contiguous positions. For M-RoPE (Qwen-VL) the kept rows also carry their
unpruned ``(t, h, w)`` positions, appended as extra channels (:mod:`.wire`), as vLLM's EVS video
pruning does, and ``recompute_mrope_positions`` puts them in place (:mod:`.positions`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from vllm.logger import init_logger

from vllm_tokenprune.config import TokenPruneConfig, config_from_hf_config
from vllm_tokenprune.models.positions import fill_media_positions, full_positions
from vllm_tokenprune.models.wire import (
    POS_CHANNELS,
    Grid,
    ItemParams,
    decode_positions,
    encode_positions,
)
from vllm_tokenprune.scoring import get_method, select_tokens_batch

logger = init_logger(__name__)


class TokenPruneModelMixin:
    """Mix into a vLLM multimodal model class, before it in the MRO.

    ``__init__`` runs the model's own and then :meth:`_tp_setup`. Subclasses implement
    ``embed_multimodal`` with :meth:`_tp_select` and, for M-RoPE models, :meth:`_tp_prune`
    and ``recompute_mrope_positions`` (:meth:`_tp_recompute_mrope_positions`).
    """

    tp_config: TokenPruneConfig
    #: The LM uses M-RoPE: kept rows carry their unpruned positions (POS_CHANNELS extra
    #: channels) until ``recompute_mrope_positions`` strips them. False for 1-D RoPE (LLaVA).
    tp_mrope: ClassVar[bool] = True

    def __init__(self, *, vllm_config: Any = None, prefix: str = "", **kwargs: Any) -> None:
        # vLLM passes (vllm_config=, prefix=) to classes whose __init__ names them.
        if vllm_config is None:  # not built by vLLM (unit tests of the helpers)
            super().__init__(**kwargs)
            return
        self._tp_pre_init(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tp_setup(vllm_config)

    def _tp_pre_init(self, vllm_config: Any) -> None:
        """Before the model's own ``__init__``: refuse EVS; switch multimodal pruning on."""
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

    def _tp_setup(self, vllm_config: Any) -> None:
        from vllm_tokenprune import metrics
        from vllm_tokenprune.plugin import check_request_bridge

        model_config = vllm_config.model_config
        self.tp_config = config_from_hf_config(model_config.hf_config)
        check_request_bridge()
        metrics.init_worker(model_config.served_model_name)
        if self.tp_mrope:
            self.is_multimodal_pruning_enabled = True

    def _tp_embed_width(self) -> int:
        """Width of a media embedding row as the LM's ``embed_input_ids`` expects it."""
        return int(self.config.get_text_config().hidden_size)  # type: ignore[attr-defined]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None,
                        **kwargs: Any) -> torch.Tensor:
        """Guard: rows still carrying position channels mean the model runner never called
        ``recompute_mrope_positions`` (vLLM 0.32's ``CPUModelRunner.load_model`` skips the
        switch; ``scripts/cpu_dev_shims.py`` restores it). Serve rather than crash: strip the
        channels, keep the provisional positions, and say so once."""
        if self.tp_mrope and multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            if multimodal_embeddings[0].shape[-1] == self._tp_embed_width() + POS_CHANNELS:
                if not getattr(self, "_tp_warned_no_recompute", False):
                    self._tp_warned_no_recompute = True
                    logger.error(
                        "vllm-tokenprune: the model runner did not call "
                        "recompute_mrope_positions, so kept visual tokens get approximate "
                        "positions. On vLLM CPU builds install scripts/cpu_dev_shims.py "
                        "(scripts/setup-cpu.sh does)."
                    )
                multimodal_embeddings = [m[:, :-POS_CHANNELS] for m in multimodal_embeddings]
        return super().embed_input_ids(  # type: ignore[misc]
            input_ids, multimodal_embeddings, **kwargs
        )

    def _tp_text_embeds(self, ids_row: torch.Tensor, device: torch.device) -> torch.Tensor:
        ids = ids_row[ids_row >= 0].to(device)
        return self.get_language_model().embed_input_ids(ids)  # type: ignore[attr-defined]

    def _tp_params(self, params: torch.Tensor | None, sizes: Sequence[int],
                   grids: Sequence[Grid | None] | None = None) -> list[ItemParams]:
        """The batch's params rows (CPU tensor: no device sync). Without them (e.g. dummy
        profiling inputs from an older cache entry) every item keeps all of its tokens."""
        if params is None:
            method = self.tp_config.method
            grids = grids or [None] * len(sizes)
            return [ItemParams(n, method, n, g, ()) for n, g in zip(sizes, grids, strict=True)]
        rows = params.reshape(len(sizes), -1).tolist()
        out = [ItemParams.from_row(r) for r in rows]
        for p, n in zip(out, sizes, strict=True):
            if p.num_tokens != n:
                raise RuntimeError(
                    f"vllm-tokenprune: the encoder produced {n} tokens for an item the "
                    f"processor counted {p.num_tokens} for"
                )
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
        from vllm_tokenprune import metrics

        keep_idx: list[torch.Tensor | None] = [None] * len(feats)
        by_method: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if p.num_keep < feats[i].shape[0]:
                by_method[p.method].append(i)
        for method, items in by_method.items():
            text = None
            if get_method(method).uses_text and text_ids is not None:
                text = [self._tp_text_embeds(text_ids[i], feats[i].device) for i in items]
                text = [t if t.shape[0] > 0 else None for t in text]
            start = time.perf_counter()
            selected = select_tokens_batch(
                [feats[i] for i in items],
                [params[i].num_keep for i in items],
                method,
                text_embeds=text,
                grids=[params[i].grid for i in items],
                **self.tp_config.options_for(method),
            )
            elapsed = time.perf_counter() - start
            for i, idx in zip(items, selected, strict=True):
                keep_idx[i] = idx
            metrics.record_scorer_time(method, modality, elapsed)
        return keep_idx

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
        items = self._tp_params(params, [e.shape[0] for e in embeds])
        keep = self._tp_select(modality, [self._tp_score_view(e) for e in embeds], items,
                               text_ids)
        return tuple(
            e if idx is None else e.index_select(0, idx)
            for e, idx in zip(embeds, keep, strict=True)
        )

    def _tp_prune(
        self,
        modality: str,
        embeds: Sequence[torch.Tensor],
        grids: Sequence[Grid],
        t_factors: Sequence[float],
        params: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """M-RoPE models: select each item's kept rows; append their encoded unpruned
        positions (``grids``: the items' LM token grids, ``t_factors``: time-step scaling)."""
        items = self._tp_params(params, [e.shape[0] for e in embeds], grids)
        keep = self._tp_select(modality, [self._tp_score_view(e) for e in embeds], items,
                               text_ids)
        out = []
        for i, emb in enumerate(embeds):
            t, h, w = grids[i]
            pos = full_positions(t, h, w, t_factors[i])
            idx = keep[i]
            if idx is not None:
                emb = emb.index_select(0, idx)
                pos = pos.index_select(0, idx.cpu())
            out.append(self._tp_with_positions(emb, pos[:, :3]))
        return tuple(out)

    @staticmethod
    def _tp_with_positions(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Append (n, 3) relative positions to (n, D) rows as POS_CHANNELS channels."""
        enc = encode_positions(pos, rows.dtype).to(rows.device, non_blocking=True)
        return torch.cat([rows, enc], dim=1)

    def _tp_recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
        *,
        media_token_ids: Sequence[int],
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """``SupportsMultiModalPruning.recompute_mrope_positions`` for pruned media.

        ``mrope_positions`` already holds the right positions for every text token (see
        :func:`.positions.mrope_positions_for_spans`); this fills in the real positions of the
        kept media slots whose embeddings this step carries
        (:func:`.positions.fill_media_positions`).
        """
        embeds = [mm[:, :-POS_CHANNELS] for mm in multimodal_embeddings]
        positions = mrope_positions.clone()
        if not multimodal_embeddings:
            return embeds, positions, int(positions.max()) + 1 - positions.shape[1]
        rel = torch.cat(
            [decode_positions(mm[:, -POS_CHANNELS:]).cpu() for mm in multimodal_embeddings], dim=1
        )
        positions_cpu = fill_media_positions(
            input_ids, rel, mrope_positions, num_computed_tokens, media_token_ids
        )
        positions = positions_cpu.to(mrope_positions.device)
        delta = int(positions_cpu.max()) + 1 - positions_cpu.shape[1]
        return embeds, positions, delta
