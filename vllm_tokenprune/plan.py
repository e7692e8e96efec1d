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

A modality's ``why`` records where its ratio comes from (``"request"``: the request's field,
``"server"``: the server's default, ``"profile"``: vLLM's profiling dummy, unpruned). An item's
``why`` records what decided its count (:data:`REASONS`): ``"ratio"`` (the modality's ratio),
``"auto"`` (``prune_ratio: "auto"``, the count estimated from the item's pixels), ``"detail"``
(the image's ``detail``: ``"low"`` capped it at ``token_prune.low_detail_tokens``, ``"high"``
kept every token), ``"cap"`` (its share of ``max_visual_tokens``), ``"profile"``.

**The count rule** (:func:`item_counts`, docs/budgets.md): each item's count is the strictest
of its ratio's count (or auto's estimate; ``detail: "high"`` replaces both by all its tokens),
``low_detail_tokens`` for ``detail: "low"``, and its share of the request's cap. The cap is
split by :func:`split_cap`: every item keeps ``min(min_keep, count)``, the rest of the cap is
shared in proportion to what each item would keep above that without the cap (largest
remainders first, ties to the earlier item: images before videos, prompt order), so the
shares sum to exactly the cap and no item gets more than it would without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from vllm_tokenprune.config import (
    AUTO,
    DETAIL_KEY,
    SEALED_FIELDS,
    TokenPruneConfig,
    parse_request_fields,
)
from vllm_tokenprune.models.wire import Grid, ItemLayout, ItemParams
from vllm_tokenprune.scoring import LAYER, get_method, make_options, num_kept

MODALITIES = ("image", "video")
#: Where a modality's ratio comes from.
REQUEST, SERVER, PROFILE = "request", "server", "profile"
#: What decided an item's count (the ``reason`` label of the per-item metric; a closed set).
RATIO, AUTO_COUNT, DETAIL, CAP = "ratio", "auto", "detail", "cap"
REASONS = (RATIO, AUTO_COUNT, DETAIL, CAP, PROFILE)


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
    #: ``prune_ratio: "auto"``: each item's count is estimated from its pixels.
    auto: bool = False

    @property
    def field(self) -> str:
        """The request field that sets this modality's ratio."""
        return "video_prune_ratio" if self.modality == "video" else "prune_ratio"

    @property
    def prunes(self) -> bool:
        """Whether the items' selection depends on the method (ratio > 0, or auto)."""
        return self.ratio > 0.0 or self.auto


@dataclass(frozen=True)
class RequestPlan:
    """A request's resolved pruning fields: its method and one plan per modality."""

    method: str
    modalities: Mapping[str, ModalityPlan]
    #: ``max_visual_tokens`` (the request's, else the server's; None: no cap).
    cap: int | None = None
    #: Each image's ``detail`` (``"low"``, ``"high"`` or None), by image index.
    details: tuple[str | None, ...] = ()
    #: ``token_prune.low_detail_tokens``.
    low_detail_tokens: int = 0

    def __getitem__(self, modality: str) -> ModalityPlan:
        return self.modalities[modality]

    def detail(self, modality: str, index: int) -> str | None:
        """Item ``index``'s ``detail`` (only images carry one)."""
        if modality != "image" or not 0 <= index < len(self.details):
            return None
        return self.details[index]

    def budgeted(self) -> bool:
        """Whether a count here can depend on more than the modality's ratio."""
        return self.cap is not None or any(d is not None for d in self.details) or any(
            mp.auto for mp in self.modalities.values())


def resolve_request(cfg: TokenPruneConfig, mm_kwargs: Mapping[str, object], *,
                    profiling: bool = False, num_layers: Callable[[], int] = lambda: 0
                    ) -> RequestPlan:
    """The request's plan: its fields validated once (:func:`parse_request_fields`, a
    RequestFieldError naming a bad one), defaults from ``cfg``. ``profiling``: vLLM's dummy
    inputs, unpruned. ``num_layers``: the language model's decoder layers (asked only for a
    layer-stage method)."""
    fields: dict[str, Any] = {} if profiling else parse_request_fields(
        {k: v for k, v in mm_kwargs.items() if k in SEALED_FIELDS}, cfg)
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
                ratio, why = fields[field], REQUEST
                break
        auto = ratio == AUTO and not profiling
        plans[modality] = ModalityPlan(modality, method, spec.stage,
                                       0.0 if profiling or auto else float(ratio), why, layers,
                                       spec.uses_text and spec.stage != LAYER, spec.greedy, auto)
    if profiling:
        return RequestPlan(method, plans)
    cap = fields.get("max_visual_tokens", cfg.max_visual_tokens)
    if cap is not None and spec.stage == LAYER:
        cap = None  # a layer-stage default method: refused at start-up with a server cap
    return RequestPlan(method, plans, None if cap is None else int(cap),
                       tuple(fields.get(DETAIL_KEY, ())), cfg.low_detail_tokens)


def split_cap(counts: Sequence[int], cap: int, min_keep: int) -> list[int]:
    """Each item's share of ``cap`` given its count without the cap (``counts``): the counts
    themselves when they fit; else every item keeps ``min(min_keep, count)`` and the rest is
    shared in proportion to each count above that, largest remainders first (ties: the earlier
    item). The shares sum to exactly ``cap``, and none exceeds its count. ValueError when
    ``cap`` is below the floors' sum."""
    counts = [int(c) for c in counts]
    if sum(counts) <= cap:
        return counts
    floors = [min(min_keep, c) for c in counts]
    extra = cap - sum(floors)
    if extra < 0:
        raise ValueError(f"max_visual_tokens: {cap} is below what the request's {len(counts)} "
                         f"media items keep at least ({sum(floors)}, token_prune.min_keep = "
                         f"{min_keep} each)")
    weights = [c - f for c, f in zip(counts, floors, strict=True)]
    total = sum(weights)  # > extra, as sum(counts) > cap
    shares = [extra * w // total for w in weights]
    left = extra - sum(shares)
    order = sorted(range(len(counts)), key=lambda i: (-(extra * weights[i] % total), i))
    for i in order[:left]:
        shares[i] += 1
    return [f + s for f, s in zip(floors, shares, strict=True)]


def item_counts(request: RequestPlan, items: Sequence[tuple[str, int, int, int | None]],
                min_keep: int) -> list[tuple[int, str]]:
    """The count rule (module docstring) for a request's items: each ``(modality, index,
    num_tokens, auto_keep)`` (``auto_keep``: auto's estimate, None when the modality's ratio is
    not auto) gives ``(num_keep, why)``."""
    out: list[tuple[int, str]] = []
    for modality, index, n, auto_keep in items:
        mp = request[modality]
        detail = request.detail(modality, index)
        if detail == "high":
            keep, why = n, DETAIL
        elif auto_keep is not None:
            keep, why = min(n, max(min(min_keep, n), int(auto_keep))), AUTO_COUNT
        else:
            keep, why = num_kept(n, mp.ratio, min_keep), RATIO
        if detail == "low":
            low = min(n, max(min_keep, request.low_detail_tokens))
            if low < keep:
                keep, why = low, DETAIL
        out.append((keep, why))
    if request.cap is not None:
        shares = split_cap([k for k, _ in out], request.cap, min_keep)
        out = [(s, CAP) if s < k else (k, why) for s, (k, why) in zip(shares, out, strict=True)]
    return out


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
    def plan(cls, mp: ModalityPlan, index: int, layout: ItemLayout, min_keep: int,
             count: tuple[int, str] | None = None) -> ItemPlan:
        """The plan of an item of ``layout``: ``count`` (``(num_keep, why)`` from
        :func:`item_counts`), by default the keep-count rule (:func:`vllm_tokenprune.num_kept`)
        at the modality's ratio."""
        keep, why = count or (num_kept(layout.num_tokens, mp.ratio, min_keep),
                              PROFILE if mp.why == PROFILE else RATIO)
        return cls(mp.modality, index, mp.method, mp.stage, mp.ratio, layout.num_tokens, keep,
                   layout.grid, tuple(layout.extra), mp.layers, why)

    @classmethod
    def from_row(cls, mp: ModalityPlan, index: int, row: Sequence[int]) -> ItemPlan:
        """The plan an item's params row was written from (an item the processor cache
        returned); ValueError for a row no plan writes."""
        p = ItemParams.from_row(row)
        why = PROFILE if mp.why == PROFILE else RATIO
        return cls(mp.modality, index, p.method, p.stage, mp.ratio, p.num_tokens, p.num_keep,
                   p.grid, p.extra, mp.layers if p.method == mp.method else 0, why)

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
