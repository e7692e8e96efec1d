"""Vision-tower calls within the profiled encoder budget, pixels staged per call, and the scorer
inside vLLM's profile run (see docs/worker-safety.md and :mod:`.staging`). Runs in the worker.

Mixed into :class:`.model_hooks.TokenPruneModelMixin`. A family's ``embed_multimodal`` hands
:meth:`EncoderBudgetMixin._tp_encode_in_chunks` each item's unpruned charge, its parsed vLLM
input and a ``run(sub_input, items)`` that runs the vision tower and prunes; the batch is cut
into consecutive sub-batches of at most the profiled batch, run one after the other, each with
only its own pixels on the device. On vLLM's profiling dummy batch (marked by the processor)
every allowed scorer also runs at its worst; a failure there stops start-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.log import init_logger
from vllm_tokenprune.models import faults, staging
from vllm_tokenprune.models.wire import MAX_TEXT_TOKENS, STAGED_FIELDS, ItemParams, profile_key
from vllm_tokenprune.scoring import get_method, list_methods, select_tokens_batch
from vllm_tokenprune.scoring._graphs import graph_memory_budget

logger = init_logger(__name__)


class EncoderBudgetMixin:
    tp_config: TokenPruneConfig
    _tp_encoder_cap: int | None = None
    _tp_sweep_now: bool = False
    #: Whether the profile run measures memory here, so the scorer sweep belongs in it.
    _tp_sweep_enabled: bool = True
    #: Pixel bytes of vLLM's profiling dummy batch (None until the profile run came by).
    _tp_profiled_bytes: int | None = None
    #: Where the pixels go: the device of the model's weights (the runner's device), read at
    #: the first staging (None until then); pinned first when that is not the host.
    _tp_stage_device: torch.device | None = None
    _tp_pin_available: bool = False

    def _tp_text_embeds(self, ids_row: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _tp_setup_encoder_cap(self, vllm_config: Any) -> None:
        """The unpruned tokens one vision-tower call may take: what vLLM's profile run
        measured (see :mod:`.staging`); where sub-batches' pixels are staged."""
        from vllm.utils.platform_utils import is_pin_memory_available

        self._tp_sweep_now = False
        self._tp_profiled_bytes = None
        self._tp_sweep_enabled = _profile_sizes_memory(vllm_config)
        if not self._tp_sweep_enabled:
            logger.info("vllm-tokenprune: the profile run does not run the scorers: vLLM's CPU "
                        "worker takes the KV cache size from VLLM_CPU_KVCACHE_SPACE / "
                        "--kv-cache-memory-bytes, not from a memory profile")
        self._tp_stage_device = None  # the weights' device, read at the first staging
        self._tp_pin_available = is_pin_memory_available()
        try:
            self._tp_encoder_cap, _ = staging.profiled_encoder_tokens(vllm_config)
        except Exception as e:
            raise RuntimeError(
                "vllm-tokenprune: cannot compute the encoder batch vLLM profiles "
                f"(MultiModalBudget: {type(e).__name__}: {e}); without it vision-tower calls "
                "could exceed the profiled memory, so the server does not start") from e
        if self._tp_encoder_cap:
            logger.info("vllm-tokenprune: vision-tower calls are limited to %d unpruned tokens "
                        "(the profiled encoder batch)", self._tp_encoder_cap)
        faults.watch_tower(self, self._tp_encoder_cap)  # test-only, inert without its env

    def _tp_charge(self, p: ItemParams) -> int:
        """What vLLM would charge an item against the encoder budget if it were not pruned."""
        return p.num_tokens

    @staticmethod
    def _tp_is_profile(kwargs: Mapping[str, object], modality: str) -> bool:
        """Whether this batch is vLLM's profiling dummy batch (the processor marks it)."""
        return kwargs.get(profile_key(modality)) is not None

    def _tp_stage(self, sub: Any) -> Any:
        """``sub`` with its pixel fields on the runner's device (accounted in the test log:
        ``stage <bytes> <profiled batch's bytes, 0 if unknown>``)."""
        device = self._tp_stage_device
        if device is None:
            param = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
            device = self._tp_stage_device = (
                param.device if param is not None else torch.device("cpu"))
        pin = device.type != "cpu" and self._tp_pin_available
        staged, nbytes = staging.stage_items(sub, STAGED_FIELDS, device, pin)
        if nbytes:
            faults.log_encoder_call("stage", nbytes, self._tp_profiled_bytes)
        return staged

    def _tp_encode_in_chunks(
        self,
        charges: Sequence[int],
        mm_input: Any,
        flat: dict[str, Sequence[int]] | None,
        run: Callable[[Any, range], Sequence[torch.Tensor]],
        *,
        profile: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Run ``run(sub_input, items)`` (vision tower + pruning) on consecutive sub-batches
        whose unpruned token count, and pixel bytes once the profile run measured them, stay
        within the profiled encoder batch, each with only its own pixels moved to the device.
        ``profile``: vLLM's profiling dummy batch, where every allowed scorer also runs at its
        worst and whose pixel bytes bound later sub-batches (LLaVA-NeXT's tiles are not
        proportional to its tokens)."""
        cap = self._tp_encoder_cap
        total = sum(charges)
        faults.log_encoder_call("batch", total, cap)
        sizes = staging.item_bytes(mm_input, STAGED_FIELDS, len(charges), flat)
        if profile:
            self._tp_profiled_bytes = max(self._tp_profiled_bytes or 0, sum(sizes)) or None
        chunks = staging.plan_chunks(charges, cap, sizes, self._tp_profiled_bytes)
        out: tuple[torch.Tensor, ...] = ()
        self._tp_sweep_now = profile and self._tp_sweep_enabled
        try:
            for items in chunks:
                faults.log_encoder_call("call", sum(charges[i] for i in items), cap)
                sub = mm_input if len(chunks) == 1 else staging.slice_items(
                    mm_input, items, len(charges), flat)
                sub = self._tp_stage(sub)
                out += tuple(run(sub, items))
                del sub  # this sub-batch's device pixels go before the next one's come
        finally:
            self._tp_sweep_now = False
        return out

    def _tp_profile_sweep(self, feats: Sequence[torch.Tensor],
                          params: Sequence[ItemParams]) -> None:
        """Every method this server allows, on every item, keeping N - 1 tokens (the largest
        selection a request can ask for; greedy methods at most ``max_greedy_keep``, the most
        the processor lets a request keep with them), results discarded: the scorer's working
        memory at its worst, inside vLLM's memory profiling.

        Runs on vLLM's profiling dummy batch only; any failure raises, so start-up stops with
        the cause instead of every later request of that method taking the uniform fallback.
        """
        cfg = self.tp_config
        methods = [m for m in cfg.allowed_methods or list_methods() if m in list_methods()]
        full = [max(1, f.shape[0] - 1) for f in feats]
        grids = [p.grid if p.grid and p.grid[0] * p.grid[1] * p.grid[2] == f.shape[0] else None
                 for p, f in zip(params, feats, strict=True)]
        start = time.perf_counter()
        for method in methods:
            keep = [min(k, cfg.max_greedy_keep) for k in full] if get_method(method).greedy \
                else full
            try:
                text = None
                if get_method(method).uses_text:
                    ids = torch.zeros(MAX_TEXT_TOKENS, dtype=torch.long)
                    text = [self._tp_text_embeds(ids, f.device) for f in feats]
                select_tokens_batch(list(feats), keep, method, text_embeds=text, grids=grids,
                                    **cfg.options_for(method))
            except Exception as e:
                sizes = sorted({int(f.shape[0]) for f in feats})
                raise RuntimeError(
                    f"vllm-tokenprune: the profile run could not run {method} at its worst "
                    f"({len(feats)} items of {sizes} tokens, keeping {max(keep)}): "
                    f"{type(e).__name__}: {e}. Requests using {method} would fail the same way, "
                    f"so the server does not start; remove {method} from "
                    "token_prune.allowed_methods, lower token_prune.max_greedy_keep (greedy "
                    "methods), or profile smaller media (--max-model-len, "
                    "--limit-mm-per-prompt, --max-num-batched-tokens)") from e
        _reserve_graph_memory(feats, methods)
        logger.info("vllm-tokenprune: profiled the scorers (%s) on %d items in %.2f s",
                    ", ".join(methods), len(feats), time.perf_counter() - start)


def _profile_sizes_memory(vllm_config: Any) -> bool:
    """Whether vLLM sizes memory from what the profile run used. GPU workers always profile
    (``determine_available_memory``); vLLM's CPU worker runs ``profile_run`` only as a
    compilation warm-up, and then measures its memory (RSS) only when it sizes the KV cache
    itself (no explicit ``kv_cache_memory_bytes``, which ``VLLM_CPU_KVCACHE_SPACE`` sets)."""
    from vllm.platforms import current_platform

    cache = getattr(vllm_config, "cache_config", None)
    return not (current_platform.is_cpu()
                and getattr(cache, "kv_cache_memory_bytes", None) is not None)


def _reserve_graph_memory(feats: Sequence[torch.Tensor], methods: Sequence[str]) -> None:
    """On CUDA, allocate (and free) the greedy scorers' CUDA-graph budget inside the memory
    profile, so that vLLM sizes the KV cache with room for the graphs captured later
    (``scoring/_graphs.py``)."""
    device = feats[0].device if feats else None
    if device is None or device.type != "cuda" or \
            not any(get_method(m).greedy for m in methods):
        return
    budget = graph_memory_budget()
    if budget > 0:
        reserved = torch.empty(budget, dtype=torch.uint8, device=device)
        del reserved
