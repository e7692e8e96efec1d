"""Vision-tower calls within the profiled encoder budget, and the scorer inside vLLM's profile
run (see docs/worker-safety.md and :mod:`vllm_tokenprune.guard`).

Mixed into :class:`.model.TokenPruneModelMixin`. A family's ``embed_multimodal`` hands
:meth:`EncoderBudgetMixin._tp_encode_in_chunks` each item's unpruned charge, its parsed vLLM
input and a ``run(sub_input, items)`` that runs the vision tower and prunes; the batch is cut
into consecutive sub-batches of at most the profiled batch, run one after the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_tokenprune import guard
from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.models.wire import ItemParams
from vllm_tokenprune.scoring import get_method, list_methods, select_tokens_batch

logger = init_logger(__name__)


class EncoderBudgetMixin:
    tp_config: TokenPruneConfig
    _tp_encoder_cap: int | None = None
    _tp_profile_sweep_done: bool = False
    _tp_sweep_now: bool = False

    def _tp_text_embeds(self, ids_row: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _tp_setup_encoder_cap(self, vllm_config: Any) -> None:
        """The unpruned tokens one vision-tower call may take: what vLLM's profile run
        measured (see :mod:`vllm_tokenprune.guard`)."""
        self._tp_encoder_cap: int | None = None
        self._tp_profile_sweep_done = False
        self._tp_sweep_now = False
        try:
            self._tp_encoder_cap, _ = guard.profiled_encoder_tokens(vllm_config)
        except Exception as e:  # noqa: BLE001 - serve without the guard rather than not at all
            logger.warning("vllm-tokenprune: cannot compute the profiled encoder budget (%s); "
                           "vision-tower calls are not split", e)
        if self._tp_encoder_cap:
            logger.info("vllm-tokenprune: vision-tower calls are limited to %d unpruned tokens "
                        "(the profiled encoder batch)", self._tp_encoder_cap)
        guard.watch_tower(self, self._tp_encoder_cap)  # test-only, inert without its env

    def _tp_charge(self, p: ItemParams) -> int:
        """What vLLM would charge an item against the encoder budget if it were not pruned."""
        return p.num_tokens

    def _tp_encode_in_chunks(
        self,
        charges: Sequence[int],
        mm_input: Any,
        flat: dict[str, Sequence[int]] | None,
        run: Callable[[Any, range], Sequence[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        """Run ``run(sub_input, items)`` (vision tower + pruning) on consecutive sub-batches
        whose unpruned token count stays within the profiled encoder batch."""
        cap = self._tp_encoder_cap
        total = sum(charges)
        guard.log_encoder_call("batch", total, cap)
        chunks = guard.plan_chunks(charges, cap)
        # vLLM's profile run feeds exactly the profiled batch; the first such batch also runs
        # every allowed scorer at its worst, so profiling measures the scorer's memory too.
        self._tp_sweep_now = bool(cap) and total == cap and not self._tp_profile_sweep_done
        out: tuple[torch.Tensor, ...] = ()
        for items in chunks:
            guard.log_encoder_call("call", sum(charges[i] for i in items), cap)
            sub = mm_input if len(chunks) == 1 else guard.slice_items(
                mm_input, items, len(charges), flat)
            out += tuple(run(sub, items))
        self._tp_sweep_now = False
        return out

    def _tp_profile_sweep(self, feats: Sequence[torch.Tensor],
                          params: Sequence[ItemParams]) -> None:
        """Every method this server allows, on every item, keeping N - 1 tokens (the largest
        selection a request can ask for; greedy methods at most ``max_greedy_keep``), results
        discarded: the scorer's working memory at
        its worst, inside vLLM's memory profiling."""
        self._tp_profile_sweep_done = True
        cfg = self.tp_config
        methods = [m for m in cfg.allowed_methods or list_methods() if m in list_methods()]
        full = [max(1, f.shape[0] - 1) for f in feats]
        grids = [p.grid if p.grid and p.grid[0] * p.grid[1] * p.grid[2] == f.shape[0] else None
                 for p, f in zip(params, feats, strict=True)]
        start = time.perf_counter()
        for method in methods:
            text = None
            if get_method(method).uses_text:
                from vllm_tokenprune.models.processor import MAX_TEXT_TOKENS

                ids = torch.zeros(MAX_TEXT_TOKENS, dtype=torch.long)
                text = [self._tp_text_embeds(ids, f.device) for f in feats]
            # greedy methods: the processor refuses keeping more than max_greedy_keep
            keep = [min(k, cfg.max_greedy_keep) for k in full] if get_method(method).greedy \
                else full
            try:
                select_tokens_batch(list(feats), keep, method, text_embeds=text, grids=grids,
                                    **cfg.options_for(method))
            except Exception as e:  # noqa: BLE001 - profiling must not stop the server
                logger.warning("vllm-tokenprune: profiling %s failed: %s", method, e)
        logger.info("vllm-tokenprune: profiled the scorers (%s) on %d items in %.2f s",
                    ", ".join(methods), len(feats), time.perf_counter() - start)
