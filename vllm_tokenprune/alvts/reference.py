"""ALVTS on transformers' own models (outside vLLM): the reference the server is checked against.

Straightforward by design. Forward hooks on the language model's decoder layers: at a routed
layer ``l``, during a forward pass that holds the whole prompt (prefill), each media item's
visual tokens are scored with :class:`~vllm_tokenprune.alvts.AlvtsRouter` on the hidden states
entering the layer; the layer runs unchanged on every token (so every token's K/V at layer ``l``
come from the hidden state it entered with, and the routed tokens attend to all keys), then the
outputs of the tokens that skip the layer are replaced by their inputs (their attention output
and MLP are discarded: the residual stream passes through). Forward passes of another length
(decode steps) are not routed. Items are the contiguous runs of the model's image/video
placeholder token ids in ``input_ids``. Supported: transformers' Qwen2-VL, Qwen2.5-VL, LLaVA-1.5
and LLaVA-NeXT classes (any model whose decoder layers sit at ``model.model.language_model.layers``
with Llama/Qwen2-style ``self_attn.{q,k}_proj`` and ``input_layernorm``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, layer_factors, num_processed

__all__ = ["RoutingLog", "decoder_layers", "item_spans", "routed", "router_for", "text_config"]

_PLACEHOLDER_ATTRS = ("image_token_id", "video_token_id", "image_token_index",
                      "video_token_index")


def text_config(model: Any) -> Any:
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The language model's decoder layers of a transformers VLM."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", inner)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise ValueError(f"no decoder layers found on {type(model).__name__}")
    return layers


def router_for(model: Any, options: AlvtsOptions) -> AlvtsRouter:
    """Factors of every routed layer (``options.first_layer`` to the last) from the weights."""
    tc = text_config(model)
    heads = tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    eps = float(getattr(tc, "rms_norm_eps", 1e-6))
    factors = {}
    for i, layer in enumerate(decoder_layers(model)):
        if i < options.first_layer:
            continue
        attn = layer.self_attn
        factors[i] = layer_factors(
            attn.q_proj.weight, attn.k_proj.weight, num_heads=heads, num_kv_heads=kv_heads,
            rank=options.rank, q_bias=attn.q_proj.bias,
            norm_weight=layer.input_layernorm.weight, eps=eps)
    return AlvtsRouter(factors, options)


def placeholder_ids(model: Any) -> set[int]:
    cfg = model.config
    return {v for a in _PLACEHOLDER_ATTRS if isinstance(v := getattr(cfg, a, None), int)}


def item_spans(input_ids: Tensor, ids: set[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of placeholder ids in a 1-D ``input_ids``."""
    flags = [int(t) in ids for t in input_ids.tolist()]
    spans, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            spans.append((start, i))
            start = None
    return spans


@dataclass
class RoutingLog:
    """What the reference routed: ``processed[layer][item]`` = ascending indices within the
    item of the tokens that went through ``layer``; ``spans`` the items' [start, end)."""

    spans: list[tuple[int, int]]
    processed: dict[int, list[Tensor]] = field(default_factory=dict)
    #: Scored tokens per item (default: the whole span).
    sizes: list[int] = field(default_factory=list)

    def skipped_token_layers(self) -> int:
        sizes = self.sizes or [e - s for s, e in self.spans]
        return sum(n - len(p) for per in self.processed.values()
                   for n, p in zip(sizes, per, strict=True))


@contextmanager
def routed(model: Any, input_ids: Tensor, prune_ratio: float | Sequence[float],
           options: AlvtsOptions | None = None, *, min_keep: int = 1,
           router: AlvtsRouter | None = None,
           scored: Sequence[Tensor] | None = None) -> Iterator[RoutingLog]:
    """Route ``model``'s forward passes over the whole prompt ``input_ids`` (1, S).

    ``prune_ratio``: fraction of each item's visual tokens that skip each routed layer (one
    value, or one per item). ``scored``: per item, the ascending indices (within its span) of
    the tokens that are routed; the others always go through (LLaVA-NeXT's image-newline
    tokens); default every token. Yields the :class:`RoutingLog` filled by the next prefill.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("the reference routes one prompt at a time: input_ids must be (1, S)")
    options = options or AlvtsOptions()
    router = router or router_for(model, options)
    seq_len = int(input_ids.shape[1])
    spans = item_spans(input_ids[0], placeholder_ids(model))
    ratios = [prune_ratio] * len(spans) if isinstance(prune_ratio, (int, float)) \
        else list(prune_ratio)
    if len(ratios) != len(spans):
        raise ValueError(f"{len(ratios)} ratios for {len(spans)} media items")
    rows = [torch.arange(s, e) if scored is None else s + scored[i].cpu().long()
            for i, (s, e) in enumerate(spans)]
    counts = [num_processed(len(r), ratio, min_keep)
              for r, ratio in zip(rows, ratios, strict=True)]
    log = RoutingLog(spans, sizes=[len(r) for r in rows])
    states: list[dict[str, Tensor | None]] = []

    def make_hook(idx: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[0] != 1 or hidden.shape[1] != seq_len:
                return None  # not the prefill of this prompt (e.g. a decode step)
            if idx == router.routed_layers[0]:
                states[:] = [router.new_state() for _ in spans]
            out = output[0] if isinstance(output, tuple) else output
            out = out.clone()
            per_item = []
            for item_rows, k, state in zip(rows, counts, states, strict=True):
                item_rows = item_rows.to(hidden.device)
                proc = router.route(idx, hidden[0, item_rows], k, state)
                skip = torch.ones(len(item_rows), dtype=torch.bool, device=hidden.device)
                skip[proc] = False
                out[0, item_rows[skip]] = hidden[0, item_rows[skip]].to(out.dtype)
                per_item.append(proc.cpu())
            log.processed[idx] = per_item
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(make_hook(i), with_kwargs=True)
               for i in router.routed_layers]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()
