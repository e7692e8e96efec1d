"""ALVTS: layer-wise visual token routing inside the language model. Everything of it lives in
this package; this module is pure torch (no vLLM; every process).

Not an input-side scorer: ALVTS drops nothing at the input. It is registered in the method
registry at stage ``"layer"`` (:data:`vllm_tokenprune.scoring.LAYER`), with its options
(:class:`AlvtsOptions`) validated by the same machinery as every scorer's; the integration asks
the registry for a method's stage. What exists:

* :mod:`.selector`: which tokens go through a layer (pure torch);
* :class:`AlvtsRouter` (here): the per-request routing decisions over the routed layers;
* :mod:`.reference`: the same on transformers' models (tests and benchmarks);
* :mod:`.model` (worker): the model-side integration, mixed only into the families that
  serve ``alvts`` (Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, LLaVA-NeXT), and its start-up checks;
* :mod:`.scheduler` (engine core): the schedulers that keep a media item whole in one step.

Semantics, option defaults and the overlap table that chose them: ``docs/alvts.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from vllm_tokenprune.scoring import (
    LAYER,
    get_method,
    make_options,
    num_kept,
    option,
    register_method,
)

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
    "routed_layers",
    "split_tokens",
    "top_tokens",
]

ALVTS = "alvts"
#: The layer-stage methods this package provides.
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


@register_method(ALVTS, options=AlvtsOptions, stage=LAYER,
                 summary="layer-wise visual token routing inside the language model")
def routed_layers(opts: AlvtsOptions, num_layers: int) -> int:
    """Decoder layers ``alvts`` routes in a language model of ``num_layers`` layers
    (``first_layer`` to the last)."""
    return max(0, num_layers - opts.first_layer)


def alvts_options(options: Mapping[str, Any] | None = None) -> AlvtsOptions:
    """Validated :class:`AlvtsOptions`; ValueError naming an unknown key or a bad value."""
    return make_options(ALVTS, options)


def num_processed(num_tokens: int, prune_ratio: float, min_keep: int = 1) -> int:
    """Visual tokens of an item that go through each routed layer: the keep-count rule
    (:func:`vllm_tokenprune.scoring.num_kept`); the other ``N - k`` skip the layer."""
    return num_kept(num_tokens, prune_ratio, min_keep)


def is_layerwise(method: str) -> bool:
    """Whether ``method`` acts inside the language model (drops nothing at the input), as the
    registry records it (False for an unknown name)."""
    try:
        return get_method(method).stage == LAYER
    except ValueError:
        return False


class AlvtsRouter:
    """Routing decisions of one model: factors of every routed layer, built once.

    ``factors[l]`` for each routed layer ``l`` (ascending). For one item (one prefill, all of
    its visual tokens present), call :meth:`route` layer by layer in order with the item's
    hidden states entering that layer and the ``state`` dict returned by :meth:`new_state`.
    """

    def __init__(self, factors: Mapping[int, QKFactors], options: AlvtsOptions,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """``reduce`` (tensor parallelism): sums a layer's unnormalised score over the ranks
        (:func:`importance`); ``factors`` then hold this rank's heads."""
        self.factors = dict(sorted(factors.items()))
        self.options = options
        self.reduce = reduce

    @property
    def routed_layers(self) -> list[int]:
        return list(self.factors)

    @staticmethod
    def new_state() -> dict[str, Tensor | None]:
        return {"score": None}

    def score(self, layer: int, hidden: Tensor, state: dict[str, Tensor | None]) -> Tensor:
        """This layer's blended score of the item's rows ``hidden``; updates ``state``."""
        score = combine(importance(hidden, self.factors[layer], self.options.queries,
                                   reduce=self.reduce),
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
