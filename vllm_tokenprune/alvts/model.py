"""ALVTS inside vLLM: layer-wise visual token routing in the language model's decoder layers
(runs in the worker; :func:`check_alvts_server` also where the model is built).

The selector is :mod:`vllm_tokenprune.alvts` (pure torch); this module is the model-side
integration (docs/alvts.md, "In vLLM"), :class:`AlvtsModelMixin`, mixed only into the families
that serve ``alvts`` (before :class:`~vllm_tokenprune.models.model_hooks.TokenPruneModelMixin`):

* the processor leaves every visual token in the prompt and puts the per-layer count ``k`` in
  the item's params row (:mod:`.wire`, ``num_keep``);
* ``embed_multimodal`` appends :data:`.wire.ROUTE_CHANNELS` to every row of an ``alvts`` item
  (its role, its index in the item, ``k``, ``N``), so the decisions' inputs travel with the rows
  through vLLM's encoder cache exactly as the M-RoPE positions do;
* ``embed_input_ids`` strips them and records, for this step, where each item's scored rows sit
  in the flattened batch (:class:`Step`); the server's flags keep every item whole in one step;
* each routed decoder layer (vLLM's ``Qwen2DecoderLayer`` / ``LlamaDecoderLayer``, whose class
  is swapped for a subclass with :func:`_routed_forward`) scores each item on the residual
  stream entering it, runs attention on every row (so every token's K/V at the layer is written
  to the paged cache from the hidden state it entered with) and the post-attention norm + MLP on
  the rows that go through; a skipped row leaves the layer with the stream it entered with.
  Under torch.compile that tail is the opaque custom op of :mod:`.compiled` (vLLM's default
  compilation and CUDA graphs serve ``alvts``);
* the selector's factors are built once the weights are loaded, from the full-precision
  query/key weights (under vLLM's online FP8, copies taken before each layer is quantized:
  :mod:`.quant`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from vllm_tokenprune.alvts import (
    ALVTS,
    AlvtsOptions,
    AlvtsRouter,
    QKFactors,
    alvts_options,
    auto_rank,
    layer_factors,
)
from vllm_tokenprune.alvts.compiled import (
    check_compilation,
    configure_compilation,
    layer_tail_op,
    register_layer,
)
from vllm_tokenprune.alvts.quant import (
    capture_before_quantization,
    check_layer_quantization,
    quantization_refusal,
)
from vllm_tokenprune.alvts.scheduler import WholeMediaMixin, scheduler_cls_name
from vllm_tokenprune.config import TokenPruneConfig, config_from_hf_config
from vllm_tokenprune.log import init_logger
from vllm_tokenprune.metrics.worker import record_skipped
from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models.wire import (
    ROUTE_CHANNELS,
    ItemParams,
    decode_route,
    encode_route,
    route_is_video,
)

logger = init_logger(__name__)

@dataclass
class RoutedItem:
    """One item of this step: its scored rows in the flattened batch (on the residual stream's
    device) and its count ``k`` of rows that go through each routed layer."""

    rows: Tensor
    num_process: int
    state: dict[str, Tensor | None] = field(default_factory=AlvtsRouter.new_state)


@dataclass
class Step:
    """The routed items of one forward step (set by ``embed_input_ids``)."""

    items: list[RoutedItem]
    num_tokens: int


class AlvtsRuntime:
    """Shared by the routed layers of one model: the router (factors) and the current step.

    Nothing here waits for the device: every row index lives on the residual stream's device
    and every size is a host int known from the step (``k`` and ``N`` per item), so the
    complement of a selection is taken with a stable sort, never ``nonzero`` or a mask.
    """

    def __init__(self, options: AlvtsOptions) -> None:
        self.options = options
        self.router: AlvtsRouter | None = None
        self.step: Step | None = None
        #: Routed layers whose ``qkv_proj`` vLLM quantizes online (:mod:`.quant`).
        self.online_quantized: set[int] = set()
        #: Routed layer -> its full-precision (query rows, key rows[, query bias]), copied
        #: right before vLLM quantized the layer; dropped once the factors are built.
        self.full_precision: dict[int, tuple[Tensor, ...]] = {}

    def skipped_rows(self, layer: int, stream: Tensor) -> Tensor | None:
        """Rows (of the flattened batch, on ``stream``'s device, ascending per item) that skip
        ``layer`` in this step; None: none do."""
        step = self.step
        if step is None or self.router is None or stream.shape[0] < step.num_tokens:
            return None
        skipped = []
        for item in step.items:
            _, skip = self.router.route_split(layer, stream.index_select(0, item.rows),
                                              item.num_process, item.state)
            skipped.append(item.rows.index_select(0, skip))
        rows = torch.cat(skipped) if skipped else None
        return rows if rows is not None and rows.numel() else None


def complement(index: Tensor, n: int, size: int) -> Tensor:
    """The ``size`` indices of ``range(n)`` not in ``index`` (ascending, on ``index``'s
    device), without a device-to-host sync (``size`` = ``n - len(set(index))``)."""
    taken = torch.zeros(n, dtype=torch.int8, device=index.device)
    taken[index] = 1
    return torch.sort(taken, stable=True).indices[:size]


def _routed_forward(self: Any, positions: Tensor, hidden_states: Tensor,
                    residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """A routed decoder layer: vLLM's own forward (``(positions, hidden_states, residual)`` ->
    ``(hidden_states, residual)``, the stream being their sum) when nothing skips it in this
    step; otherwise the same computation with skipped rows' MLP input left out and their
    stream passed through (docs/alvts.md, exact semantics). Under torch.compile the routed
    tail is the opaque op :data:`.compiled.SPLITTING_OP`, called on every step (a compiled
    graph cannot branch on the step), which computes the plain tail when nothing routes."""
    compiling = torch.compiler.is_compiling()
    if not compiling and self._tp_alvts_runtime.step is None:
        return self._tp_alvts_base_forward(positions, hidden_states, residual)
    if residual is None:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
    else:
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
    hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
    if compiling:
        layer_tail_op()(hidden_states, residual, self._tp_alvts_op_name)
        return hidden_states, residual
    return _routed_tail(self, hidden_states, residual)


def _routed_tail(self: Any, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """The routed part of a routed layer, after attention: ``hidden_states`` is the attention
    output, ``residual`` the stream entering the layer (on which the selector scores each
    item); returns the layer's ``(hidden_states, residual)``. No item in the step: the plain
    post-attention norm and MLP. May update its inputs in place (vLLM's fused norm)."""
    runtime: AlvtsRuntime = self._tp_alvts_runtime
    skip = runtime.skipped_rows(self._tp_alvts_layer, residual)
    if skip is None:
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual
    entered = residual.index_select(0, skip)  # copied before the fused norm updates in place
    hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
    num = int(hidden_states.shape[0])
    through_rows = complement(skip, num, num - int(skip.shape[0]))
    out = torch.zeros_like(hidden_states)
    out.index_copy_(0, through_rows, self.mlp(hidden_states.index_select(0, through_rows)))
    residual = residual.index_copy(0, skip, entered)
    return out, residual


def shard_factors(attn: Any, norm: Any, options: AlvtsOptions,
                  weights: tuple[Tensor, ...] | None = None) -> QKFactors:
    """One routed layer's factors from its attention module (vLLM's ``Qwen2Attention`` /
    ``LlamaAttention``) and input norm, on this tensor-parallel rank: ``qkv_proj`` is vLLM's
    ``QKVParallelLinear``, whose weight holds this rank's query heads then its KV heads
    (``q_size`` / ``kv_size`` rows, per rank), so the factors are those of the rank's KV groups.
    The rank of the subspace is the full model's (``auto_rank`` over every KV head), the same
    on every shard; :func:`vllm_tokenprune.alvts.importance` then sums the ranks' scores.
    ``weights``: the rank's (query rows, key rows[, query bias]) in full precision, copied
    before vLLM quantized ``qkv_proj`` (:mod:`.quant`); None: read from ``qkv_proj``, which
    must then hold them unquantized."""
    if weights is None:
        weight = attn.qkv_proj.weight
        if not weight.is_floating_point() or weight.element_size() < 2:
            raise RuntimeError(
                f"vllm-tokenprune: alvts: qkv_proj holds {weight.dtype} weights and no "
                "full-precision copy was taken before they were quantized")
        bias = getattr(attn.qkv_proj, "bias", None)
        q, k = attn.q_size, attn.kv_size
        weights = (weight[:q], weight[q:q + k], *(() if bias is None else (bias[:q],)))
    q_weight, k_weight, *q_bias = weights
    rank = options.rank if options.rank is not None else auto_rank(
        int(q_weight.shape[1]), int(attn.total_num_kv_heads), int(attn.head_dim))
    return layer_factors(
        q_weight, k_weight, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
        rank=rank, q_bias=q_bias[0] if q_bias else None, norm_weight=norm.weight,
        eps=float(norm.variance_epsilon))


def tensor_parallel_reduce() -> Any:
    """The all-reduce of a layer's score over the tensor-parallel group (None: one rank, or no
    group set up, as in a model built outside vLLM's workers)."""
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    try:
        size = get_tensor_model_parallel_world_size()
    except AssertionError:  # vLLM's parallel state not initialised
        return None
    return tensor_model_parallel_all_reduce if size > 1 else None


def _routed_class(cls: type) -> type:
    """A subclass of a vLLM decoder layer class whose forward routes."""
    cached = _ROUTED_CLASSES.get(cls)
    if cached is None:
        cached = type(f"Routed{cls.__name__}", (cls,), {
            "forward": _routed_forward,
            "_tp_alvts_tail": _routed_tail,
            "_tp_alvts_base_forward": cls.forward,
        })
        _ROUTED_CLASSES[cls] = cached
    return cached


_ROUTED_CLASSES: dict[type, type] = {}


def _check_layer(cls: type) -> None:
    """Only decoder layers whose forward is vLLM's Qwen2 / Llama one (subclasses such as
    Mistral's included) can be routed: :func:`_routed_forward` repeats its steps."""
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

    if cls.forward not in (Qwen2DecoderLayer.forward, LlamaDecoderLayer.forward):
        raise ValueError(
            f"vllm-tokenprune: 'alvts' cannot route the decoder layers of this language model "
            f"({cls.__name__}): only vLLM's Qwen2 and Llama decoder layers are supported; remove "
            "'alvts' from token_prune")


def check_alvts_server(vllm_config: Any, arch: str, supported: bool) -> None:
    """Refuse, naming the flag, every server setting ``alvts`` cannot serve exactly."""
    def refuse(why: str) -> None:
        raise ValueError(
            f"vllm-tokenprune: token_prune enables 'alvts' (method or allowed_methods), "
            f"which {why}; or remove 'alvts' from token_prune (docs/alvts.md)."
        )

    if not supported:
        refuse(f"{arch} does not support (served on Qwen2-VL, Qwen2.5-VL, LLaVA-1.5)")
    check_compilation(vllm_config, refuse)
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        refuse("must see all of an item's tokens in one step, and a KV connector's external "
               "prefix hit can end inside an image: start the server without "
               "--kv-transfer-config")
    scheduler = vllm_config.scheduler_config
    threshold = int(getattr(scheduler, "long_prefill_token_threshold", 0) or 0)
    if 0 < threshold < int(scheduler.max_num_batched_tokens):
        refuse("schedules a media item whole, which a prefill cap below the step's token "
               "budget would defer forever: start the server with "
               "--long-prefill-token-threshold 0")
    if not scheduler.disable_chunked_mm_input:
        refuse("must see all of an item's tokens in one step (routing must not depend on how "
               "the scheduler chunks a prompt): start the server with --disable-chunked-mm-input")
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    cls = scheduler.get_scheduler_cls()
    async_on = bool(getattr(scheduler, "async_scheduling", False))
    name = scheduler_cls_name(async_on)
    if not (isinstance(cls, type) and issubclass(cls, WholeMediaMixin)):
        refuse("must see all of an item's tokens in one step, and vLLM's scheduler can still "
               "split an item that starts exactly where a step ends: start the server with "
               f"--scheduler-cls {name}")
    if issubclass(cls, AsyncScheduler) != async_on:
        refuse(f"needs the WholeMedia scheduler of the server's scheduling mode (async "
               f"scheduling is {'on' if async_on else 'off'}, the scheduler "
               f"{cls.__name__} is for it {'off' if async_on else 'on'}): start the server "
               f"with --scheduler-cls {name}")
    parallel = vllm_config.parallel_config
    if getattr(parallel, "enable_dbo", False):
        refuse("indexes a step's rows in the whole batch, which dual-batch overlap splits "
               "into micro-batches: start the server without --enable-dbo")
    if int(parallel.pipeline_parallel_size or 1) > 1:
        refuse("indexes a step's rows in the whole model: start the server with "
               "--pipeline-parallel-size 1 (scale with tensor or data parallelism)")
    tp = int(parallel.tensor_parallel_size or 1)
    if tp > 1:
        kv = int(vllm_config.model_config.get_total_num_kv_heads())
        if tp > kv or kv % tp:
            refuse(f"scores each KV group on the rank that holds it, and {kv} KV heads cannot "
                   f"be split over {tp} ranks without replicating them: start the server with "
                   f"a --tensor-parallel-size that divides {kv} (or data parallelism)")
    quantized = quantization_refusal(vllm_config)
    if quantized is not None:
        refuse(quantized)
    # An item larger than --max-num-batched-tokens could never be scheduled whole: vLLM's
    # encoder cache manager refuses that start-up itself under --disable-chunked-mm-input.


class AlvtsModelMixin:
    """Model-side ``alvts``: mix into a family whose language model's decoder layers are vLLM's
    Qwen2 / Llama ones, before :class:`~vllm_tokenprune.models.model_hooks.TokenPruneModelMixin`
    in the MRO. It extends the base's set-up (:meth:`_tp_pre_init`, :meth:`_tp_setup`), marks
    an item's rows for the routed layers (:meth:`_tp_layer_rows`) and takes the marks off in
    ``embed_input_ids`` (:meth:`_tp_embed_input_ids`)."""

    tp_layer_methods: ClassVar[frozenset[str]] = frozenset({ALVTS})
    #: This family serves ``alvts``.
    tp_alvts: ClassVar[bool] = True
    _tp_alvts: AlvtsRuntime | None = None

    def _tp_pre_init(self, vllm_config: Any) -> None:
        super()._tp_pre_init(vllm_config)  # type: ignore[misc]
        cfg = config_from_hf_config(vllm_config.model_config.hf_config)
        if cfg.alvts_enabled:
            check_alvts_server(vllm_config, type(self).__name__, self.tp_alvts)
            configure_compilation(vllm_config)

    def _tp_setup(self, vllm_config: Any) -> None:
        super()._tp_setup(vllm_config)  # type: ignore[misc]
        self._tp_alvts_setup(self.tp_config)  # type: ignore[attr-defined]

    def _tp_alvts_setup(self, cfg: TokenPruneConfig) -> None:
        """Swap the routed decoder layers' classes (no weights needed yet)."""
        self._tp_alvts = None
        if not cfg.alvts_enabled:
            return
        options = alvts_options(cfg.options_for(ALVTS))
        runtime = AlvtsRuntime(options)
        layers = self._tp_alvts_layers()
        if options.first_layer >= len(layers):
            raise ValueError(
                f"vllm-tokenprune: token_prune.options.alvts.first_layer = "
                f"{options.first_layer}, but the language model has {len(layers)} decoder "
                f"layers: nothing would be routed; choose a value below {len(layers)}")
        for i, layer in enumerate(layers):
            if i < options.first_layer:
                continue
            _check_layer(type(layer))
            if check_layer_quantization(layer.self_attn.qkv_proj, i):
                capture_before_quantization(layer.self_attn, i, runtime.full_precision)
                runtime.online_quantized.add(i)
            layer.__class__ = _routed_class(type(layer))
            layer._tp_alvts_runtime = runtime
            layer._tp_alvts_layer = i
            layer._tp_alvts_op_name = register_layer(layer)
        self._tp_alvts = runtime
        logger.info("vllm-tokenprune: alvts routes decoder layers %d-%d (rank %s, %d queries, "
                    "consistency %g)", options.first_layer, len(layers) - 1,
                    "auto" if options.rank is None else options.rank, options.queries,
                    options.consistency)

    def _tp_alvts_layers(self) -> Any:
        lm = self.get_language_model()  # type: ignore[attr-defined]
        return lm.model.layers

    def load_weights(self, weights: Any) -> Any:
        """Unquantized: the factors are built from ``qkv_proj``'s weights here, before vLLM's
        per-layer processing (on CPU it repacks linear weights and may drop them)."""
        loaded = super().load_weights(weights)  # type: ignore[misc]
        if self._tp_alvts is not None and not self._tp_alvts.online_quantized:
            self._tp_alvts_build()
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own processing (every loader, the
        dummy one included): online-quantized, the factors are built here from the
        full-precision copies taken as each layer was quantized, the input norms loaded."""
        parent = getattr(super(), "process_weights_after_loading", None)
        if parent is not None:
            parent()
        if self._tp_alvts is not None and self._tp_alvts.online_quantized:
            self._tp_alvts_build()

    @torch.no_grad()
    def _tp_alvts_build(self) -> None:
        """Each routed layer's query-key factors, from its fused ``qkv_proj`` weights (this
        rank's heads; the score is all-reduced over the tensor-parallel group), or from their
        full-precision copies taken before online quantization (then dropped)."""
        runtime = self._tp_alvts
        assert runtime is not None
        saved = runtime.full_precision
        missing = sorted(runtime.online_quantized - set(saved))
        if missing:
            raise RuntimeError(
                f"vllm-tokenprune: alvts: decoder layers {missing} were quantized before their "
                "full-precision query/key weights could be copied")
        factors = {i: shard_factors(layer.self_attn, layer.input_layernorm, runtime.options,
                                    saved.get(i))
                   for i, layer in enumerate(self._tp_alvts_layers())
                   if i >= runtime.options.first_layer}
        runtime.router = AlvtsRouter(factors, runtime.options, reduce=tensor_parallel_reduce())
        saved.clear()

    # -- rows
    def _tp_layer_rows(self, emb: Tensor, p: ItemParams, through: Tensor | None = None,
                       modality: str = "image") -> Tensor:
        """An ``alvts`` item's rows with :data:`ROUTE_CHANNELS` appended: each row's role (1:
        scored, 2: always goes through, ``through``: a host bool mask of those; a video's
        marked as such) and the item's count ``p.num_keep`` of scored rows that go through
        each routed layer."""
        if p.method != ALVTS:
            return super()._tp_layer_rows(emb, p, through, modality)  # type: ignore[misc]
        roles = (torch.ones(emb.shape[0], dtype=torch.int64) if through is None
                 else through.to(torch.int64) + 1)
        route = encode_route(roles, p.num_keep, emb.dtype, video=modality == "video").to(
            emb.device, non_blocking=True)
        return torch.cat([emb, route], dim=1)

    def _tp_embed_input_ids(self, input_ids: Tensor, multimodal_embeddings: Any,
                            **kwargs: Any) -> Tensor:
        embeds = self._tp_alvts_take(multimodal_embeddings, kwargs.get("is_multimodal"))
        return super()._tp_embed_input_ids(input_ids, embeds, **kwargs)  # type: ignore[misc]

    def _tp_alvts_take(self, embeds: Any, is_multimodal: Tensor | None) -> Any:
        """Strip the route channels of this step's media rows and record the step's items.

        vLLM's runners pass ``is_multimodal`` as a (pinned) host tensor while the embeddings
        and the residual stream are on the device: the items' rows are found on the host and
        moved to the device once for the step, and the route channels of every routed item
        come to the host in one copy (the step's only device-to-host sync for ``alvts``).
        Anything unexpected (no or too short ``is_multimodal``, a split or malformed item)
        serves the step's items unrouted and is counted as a fallback, never an exception.
        """
        runtime = self._tp_alvts
        if runtime is None:
            return embeds
        runtime.step = None
        width = self._tp_embed_width()  # type: ignore[attr-defined]
        if embeds is None:
            return embeds
        routed = [i for i, e in enumerate(embeds) if e.shape[-1] == width + ROUTE_CHANNELS]
        if not routed:
            return embeds
        out = [e[:, :width] if i in routed else e for i, e in enumerate(embeds)]
        try:
            items = self._tp_alvts_items(embeds, routed, width, is_multimodal)
        except Exception as e:  # noqa: BLE001 - a request's rows must not kill the engine
            fallbacks.report_fallback(ALVTS, fallbacks.LAYOUT,
                                      f"cannot route this step's items ({e})",
                                      "its tokens go through every layer (not routed)")
            return out
        if items and is_multimodal is not None:
            runtime.step = Step(items, int(is_multimodal.shape[0]))
        return out

    def _tp_alvts_items(self, embeds: Any, routed: list[int], width: int,
                        is_multimodal: Tensor | None) -> list[RoutedItem]:
        """The step's routed items (see :meth:`_tp_alvts_take`); raises on a bad layout."""
        if self._tp_alvts is not None and self._tp_alvts.router is None:
            self._tp_alvts_build()
        if is_multimodal is None:
            raise ValueError("media rows without is_multimodal")
        where = is_multimodal.to("cpu").nonzero().squeeze(1)
        sizes = [int(e.shape[0]) for e in embeds]
        if where.shape[0] != sum(sizes):
            raise ValueError(f"{sum(sizes)} media rows but is_multimodal marks "
                             f"{where.shape[0]}")
        channels = torch.cat([embeds[i][:, width:] for i in routed]).to("cpu").split(
            [sizes[i] for i in routed])
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        host_rows: list[Tensor] = []
        counts: list[int] = []
        skipped: list[tuple[str, int]] = []
        router = self._tp_alvts.router if self._tp_alvts is not None else None
        layers = len(router.factors) if router is not None else 0
        for i, chan in zip(routed, channels, strict=True):
            faults.fault_for_test(faults.FAULT_ALVTS_TAKE, sizes[i], raise_=True)
            roles, index, k, n = decode_route(chan)
            scored = roles == 1
            whole = int(scored.sum()) == n and bool(torch.equal(index[scored], torch.arange(n)))
            if not whole:
                fallbacks.report_fallback(ALVTS, fallbacks.PARTIAL_ITEM,
                                      "an item arrived split across prefill steps (is the "
                                      "server's --scheduler-cls a WholeMedia one?)",
                                      "its tokens go through every layer (not routed)")
            elif not 0 <= k <= n:
                raise ValueError(f"an item routes {k} of its {n} tokens")
            else:  # k == n (ratio 0) too: the selector runs, every row goes through
                host_rows.append(where[offsets[i]:offsets[i] + sizes[i]][scored])
                counts.append(k)
                skipped.append(("video" if route_is_video(chan) else "image", (n - k) * layers))
        if not host_rows:
            return []
        for modality, token_layers in skipped:  # only items routed (not those served unrouted)
            record_skipped(ALVTS, modality, token_layers)
        device = embeds[routed[0]].device
        rows = torch.cat(host_rows).to(device, non_blocking=True)  # one host-to-device copy
        return [RoutedItem(r, k) for r, k in zip(
            rows.split([int(h.shape[0]) for h in host_rows]), counts, strict=True)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._tp_alvts is not None:
                self._tp_alvts.step = None
