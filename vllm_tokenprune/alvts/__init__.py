"""ALVTS: layer-wise visual token routing inside the language model (pure torch, no vLLM).

Not an input-side scorer: ALVTS drops nothing at the input, so it is not in the scorer registry
(:func:`vllm_tokenprune.scoring.list_methods`); it is the one *layer-wise* method, listed in
:data:`LAYERWISE_METHODS`. What exists: the selector (:mod:`.selector`), the per-request router
(:class:`AlvtsRouter`) and a transformers reference (:mod:`.reference`). The vLLM integration is
:mod:`vllm_tokenprune.models.alvts`. Semantics, option defaults and the overlap table that chose
them: ``docs/alvts.md``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vllm_tokenprune.alvts.selector import (
    QKFactors,
    auto_rank,
    combine,
    importance,
    layer_factors,
    query_rows,
    split_tokens,
    top_tokens,
)
from vllm_tokenprune.scoring import num_kept
from vllm_tokenprune.scoring._registry import _check_bounds, _coerce, option

__all__ = [
    "ALVTS",
    "LAYERWISE_METHODS",
    "AlvtsOptions",
    "AlvtsRouter",
    "QKFactors",
    "alvts_options",
    "auto_rank",
    "combine",
    "importance",
    "layer_factors",
    "is_layerwise",
    "num_processed",
    "query_rows",
    "split_tokens",
    "top_tokens",
]

ALVTS = "alvts"
#: Methods that act inside the language model (known names, not input-side scorers).
LAYERWISE_METHODS = (ALVTS,)


@dataclass(frozen=True)
class AlvtsOptions:
    """Options of ``alvts`` (``token_prune.options.alvts``); defaults from docs/alvts.md."""

    first_layer: int = option(
        2, "First routed decoder layer (0-based); layers before it process every token.", ge=0
    )
    rank: int | None = option(
        None, "Rank of each KV group's shared query-key subspace (capped at head_dim); null "
        "(default): the largest with num_kv_heads * rank <= hidden_size / 8.", ge=1
    )
    consistency: float = option(
        0.25, "Weight of the previous routed layer's score in this layer's (0: none).",
        ge=0.0, lt=1.0,
    )
    queries: int = option(
        32, "Query rows per item: the item's own tokens, evenly strided (all when fewer).", ge=1
    )


def alvts_options(options: Mapping[str, Any] | None = None) -> AlvtsOptions:
    """Validated :class:`AlvtsOptions`; ValueError naming an unknown key or a bad value."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(AlvtsOptions)}
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for method "
                         f"'alvts'; valid options: {', '.join(fields)}")
    hints = typing.get_type_hints(AlvtsOptions)
    values = {}
    for key, value in options.items():
        where = f"option {key!r} of method 'alvts'"
        values[key] = _coerce(value, hints[key], where)
        _check_bounds(values[key], fields[key].metadata, where)
    return AlvtsOptions(**values)


def num_processed(num_tokens: int, prune_ratio: float, min_keep: int = 1) -> int:
    """Visual tokens of an item that go through each routed layer: the keep-count rule
    (:func:`vllm_tokenprune.scoring.num_kept`); the other ``N - k`` skip the layer."""
    return num_kept(num_tokens, prune_ratio, min_keep)


def is_layerwise(method: str) -> bool:
    """Whether ``method`` acts inside the language model (drops nothing at the input)."""
    return method in LAYERWISE_METHODS


class AlvtsRouter:
    """Routing decisions of one model: factors of every routed layer, built once.

    ``factors[l]`` for each routed layer ``l`` (ascending). For one item (one prefill, all of
    its visual tokens present), call :meth:`route` layer by layer in order with the item's
    hidden states entering that layer and the ``state`` dict returned by :meth:`new_state`.
    """

    def __init__(self, factors: Mapping[int, QKFactors], options: AlvtsOptions) -> None:
        self.factors = dict(sorted(factors.items()))
        self.options = options

    @property
    def routed_layers(self) -> list[int]:
        return list(self.factors)

    @staticmethod
    def new_state() -> dict[str, Tensor | None]:
        return {"score": None}

    def score(self, layer: int, hidden: Tensor, state: dict[str, Tensor | None]) -> Tensor:
        """This layer's blended score of the item's rows ``hidden``; updates ``state``."""
        score = combine(importance(hidden, self.factors[layer], self.options.queries),
                        state["score"], self.options.consistency)
        state["score"] = score
        return score

    def route(self, layer: int, hidden: Tensor, num_process: int,
              state: dict[str, Tensor | None]) -> Tensor:
        """Ascending indices (into ``hidden``'s rows) of the tokens that go through ``layer``.
        Updates ``state`` with this layer's blended score."""
        return top_tokens(self.score(layer, hidden, state), num_process)

    def route_split(self, layer: int, hidden: Tensor, num_process: int,
                    state: dict[str, Tensor | None]) -> tuple[Tensor, Tensor]:
        """(through, skipped) ascending indices, the same decision as :meth:`route`, without a
        boolean mask."""
        return split_tokens(self.score(layer, hidden, state), num_process)
