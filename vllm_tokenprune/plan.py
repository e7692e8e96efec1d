"""One plan per request: the pruning fields, resolved once (runs in the API server, where the
processor runs; vLLM also runs the processor in the engine core and the worker for its dummy
inputs).

The processor resolves a request's fields once (:func:`resolve_request`: the request's
``prune_ratio`` / ``video_prune_ratio`` / ``prune_method`` from its ``mm_processor_kwargs``, else
the server's ``token_prune`` block) into a :class:`RequestPlan`, and each media item, once its
layout is known, into an :class:`ItemPlan`. Everything downstream reads the plans: the prompt's
placeholder count, the params row the worker gets (:meth:`ItemPlan.row`), the cache-key salt,
the greedy and encoder-size checks, the metrics and the response field. An item served from
vLLM's processor cache comes back with the row its plan wrote when it was first processed
(:meth:`ItemPlan.from_row`, same request fields: they are in the cache key).

``why`` records where an item's count comes from (``"request"``: the request's field,
``"server"``: the server's default, ``"profile"``: vLLM's profiling dummy, unpruned); further
reasons (a per-request cap, an automatic ratio) extend it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from vllm_tokenprune.config import REQUEST_FIELDS, TokenPruneConfig, parse_request_fields
from vllm_tokenprune.models.wire import Grid, ItemLayout, ItemParams
from vllm_tokenprune.scoring import LAYER, get_method, make_options, num_kept

MODALITIES = ("image", "video")
#: Where an item's count comes from.
REQUEST, SERVER, PROFILE = "request", "server", "profile"


@dataclass(frozen=True)
class ModalityPlan:
    """What a request asks for the items of one modality."""

    modality: str
    method: str
    stage: str
    ratio: float
    why: str
    #: Decoder layers a layer-stage method acts on (0 for an input-side method).
    layers: int = 0
    uses_text: bool = False
    greedy: bool = False

    @property
    def field(self) -> str:
        """The request field that sets this modality's ratio."""
        return "video_prune_ratio" if self.modality == "video" else "prune_ratio"

    @property
    def prunes(self) -> bool:
        """Whether the items' selection depends on the method (ratio > 0)."""
        return self.ratio > 0.0


@dataclass(frozen=True)
class RequestPlan:
    """A request's resolved pruning fields: its method and one plan per modality."""

    method: str
    modalities: Mapping[str, ModalityPlan]

    def __getitem__(self, modality: str) -> ModalityPlan:
        return self.modalities[modality]


def resolve_request(cfg: TokenPruneConfig, mm_kwargs: Mapping[str, object], *,
                    profiling: bool = False, num_layers: Callable[[], int] = lambda: 0
                    ) -> RequestPlan:
    """The request's plan: its fields validated once (:func:`parse_request_fields`, a
    RequestFieldError naming a bad one), defaults from ``cfg``. ``profiling``: vLLM's dummy
    inputs, unpruned. ``num_layers``: the language model's decoder layers (asked only for a
    layer-stage method)."""
    fields: dict[str, Any] = {} if profiling else parse_request_fields(
        {k: v for k, v in mm_kwargs.items() if k in REQUEST_FIELDS}, cfg)
    method = str(fields.get("prune_method", cfg.method))
    spec = get_method(method)
    layers = 0
    if spec.stage == LAYER:
        layers = int(spec.fn(make_options(method, cfg.options_for(method)), num_layers()))
    plans = {}
    for modality in MODALITIES:
        why = PROFILE if profiling else SERVER
        ratio = cfg.ratio_for(modality)
        for field in (("video_prune_ratio", "prune_ratio") if modality == "video"
                      else ("prune_ratio",)):
            if field in fields:
                ratio, why = float(fields[field]), REQUEST
                break
        plans[modality] = ModalityPlan(modality, method, spec.stage,
                                       0.0 if profiling else float(ratio), why, layers,
                                       spec.uses_text and spec.stage != LAYER, spec.greedy)
    return RequestPlan(method, plans)


class ItemPlan(NamedTuple):
    """One media item's plan: what the language model gets of it, and why.

    ``num_keep``: for an input-side method the tokens kept (the prompt's placeholder count);
    for a layer-stage one the tokens that go through each of its ``layers`` decoder layers (the
    prompt keeps all ``num_tokens``). ``index``: the item's place among its modality's items in
    the prompt. ``grid`` / ``extra``: the item's layout (:class:`.models.wire.ItemLayout`).
    """

    modality: str
    index: int
    method: str
    stage: str
    ratio: float
    num_tokens: int
    num_keep: int
    grid: Grid | None
    extra: tuple[int, ...]
    layers: int
    why: str

    @classmethod
    def plan(cls, mp: ModalityPlan, index: int, layout: ItemLayout, min_keep: int) -> ItemPlan:
        """The plan of an item of ``layout``: the keep-count rule
        (:func:`vllm_tokenprune.num_kept`) at the modality's ratio."""
        keep = num_kept(layout.num_tokens, mp.ratio, min_keep)
        return cls(mp.modality, index, mp.method, mp.stage, mp.ratio, layout.num_tokens, keep,
                   layout.grid, tuple(layout.extra), mp.layers, mp.why)

    @classmethod
    def from_row(cls, mp: ModalityPlan, index: int, row: Sequence[int]) -> ItemPlan:
        """The plan an item's params row was written from (an item the processor cache
        returned); ValueError for a row no plan writes."""
        p = ItemParams.from_row(row)
        return cls(mp.modality, index, p.method, p.stage, mp.ratio, p.num_tokens, p.num_keep,
                   p.grid, p.extra, mp.layers if p.method == mp.method else 0, mp.why)

    @property
    def layout(self) -> ItemLayout:
        return ItemLayout(self.num_tokens, self.grid, self.extra)

    def row(self) -> list[int]:
        """The params row the worker reads (:class:`.models.wire.ItemParams`)."""
        return self.layout.row(self.num_keep, get_method(self.method).wire_id)

    @property
    def kept(self) -> int:
        """Visual tokens the language model's input holds (a layer-stage method drops none)."""
        return self.num_tokens if self.stage == LAYER else self.num_keep

    @property
    def skipped_token_layers(self) -> int:
        """A layer-stage item's (tokens - tokens through each layer) x layers."""
        return (self.num_tokens - self.num_keep) * self.layers if self.stage == LAYER else 0
