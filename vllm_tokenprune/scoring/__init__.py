"""Visual-token scorers: which of a media item's N tokens to keep (pure torch, no vLLM; every
process, and any Python session).

Public API::

    select_tokens(features, num_keep, method="lrcp", *, text_embeds=None, grid=None, **options)
    select_tokens_batch(features_list, num_keep_list, method="lrcp", *, text_embeds=None,
                        grids=None, **options)
    num_kept(num_tokens, prune_ratio, min_keep=1)
    list_methods(), get_method(name), register_method(name, ...), option(...), Batch,
    validate_options(method, opts), method_options(name), METHOD_OPTIONS

Every method returns ``num_keep`` unique int64 indices in ascending order on the features'
device, computed in float32 whatever the input dtype, deterministically (same input, same output;
ties go to the lowest index). See ``docs/scorers.md`` for the methods and their options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vllm_tokenprune.scoring import (  # noqa: F401  (imported to register the methods)
    cdpruner,
    divprune,
    lrcp,
    norm,
    random_,
    resprune,
    svd_prune,
    uniform,
)
from vllm_tokenprune.scoring._common import (
    Batch,
    buckets,
    check_features,
    check_finite,
    check_grid,
    check_num_keep,
    check_text,
)
from vllm_tokenprune.scoring._registry import (
    INPUT,
    LAYER,
    METHOD_OPTIONS,
    MethodSpec,
    OptionInfo,
    get_method,
    list_methods,
    load_entry_points,
    make_options,
    method_options,
    option,
    register_method,
    validate_options,
    wire_id,
)

__all__ = [
    "INPUT",
    "LAYER",
    "METHOD_OPTIONS",
    "Batch",
    "MethodSpec",
    "OptionInfo",
    "get_method",
    "list_methods",
    "load_entry_points",
    "make_options",
    "method_options",
    "num_kept",
    "option",
    "register_method",
    "select_tokens",
    "select_tokens_batch",
    "validate_options",
    "wire_id",
]


def num_kept(num_tokens: int, prune_ratio: float, min_keep: int = 1) -> int:
    """The keep-count rule used everywhere: ``max(min_keep, round(N * (1 - prune_ratio)))``,
    capped at N. ``round`` is Python's (half to even). ``prune_ratio`` must be in [0, 1)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be a non-negative int, got {min_keep!r}")
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
        raise ValueError(f"prune_ratio must be a float in [0, 1), got {prune_ratio!r}")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    return min(num_tokens, max(min_keep, round(num_tokens * (1.0 - prune_ratio))))


def _seq(value: Any, name: str, length: int) -> list[Any]:
    if value is None:
        return [None] * length
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence with one entry per item (or None)")
    if len(value) != length:
        raise ValueError(f"{name} has {len(value)} entries but there are {length} feature items")
    return list(value)


def _validate(
    features: Sequence[Tensor],
    num_keep: Sequence[int],
    text_embeds: Sequence[Tensor | None] | None,
    grids: Sequence[tuple[int, int, int] | None] | None,
    single: bool,
) -> Batch:
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise ValueError("features must be a sequence of (N_i, D) tensors")
    b = len(features)
    if isinstance(num_keep, Tensor) or not isinstance(num_keep, Sequence):
        raise ValueError("num_keep must be a sequence of ints, one per item")
    if len(num_keep) != b:
        raise ValueError(f"num_keep has {len(num_keep)} entries but there are {b} feature items")
    texts = _seq(text_embeds, "text_embeds", b)
    grid_list = _seq(grids, "grids", b)

    def name(base: str, i: int) -> str:
        return base if single else f"{base}[{i}]"

    feats, ks, txts, grs = [], [], [], []
    for i in range(b):
        f = check_features(features[i], name("features", i))
        if feats and f.shape[1] != feats[0].shape[1]:
            raise ValueError(
                f"{name('features', i)} has width {f.shape[1]} but features[0] has "
                f"{feats[0].shape[1]}; all items must share D"
            )
        if feats and f.device != feats[0].device:
            raise ValueError(
                f"{name('features', i)} is on {f.device} but features[0] is on {feats[0].device}"
            )
        n = int(f.shape[0])
        feats.append(f)
        ks.append(check_num_keep(num_keep[i], n))
        txts.append(check_text(texts[i], int(f.shape[1]), f.device))
        grs.append(check_grid(grid_list[i], n))
    text_items = [t for t in txts if t is not None]
    check_finite(feats, "features", (text_items, "text_embeds"))
    return Batch(feats, ks, txts, grs)


def _run(spec: MethodSpec, batch: Batch, opts: Any) -> list[Tensor]:
    out: list[Tensor | None] = [None] * batch.size
    todo = []
    for i, (n, k) in enumerate(zip(batch.sizes, batch.num_keep, strict=True)):
        if k == n:
            out[i] = torch.arange(n, dtype=torch.int64, device=batch.device)
        else:
            todo.append(i)
    if todo:
        sub_sizes = [batch.sizes[i] for i in todo]
        for group in buckets(sub_sizes):
            members = [todo[g] for g in group]
            results = spec.fn(batch.subset(members), opts)
            for i, idx in zip(members, results, strict=True):
                out[i] = idx
    return out  # type: ignore[return-value]


@torch.no_grad()
def select_tokens_batch(
    features: Sequence[Tensor],
    num_keep: Sequence[int],
    method: str = "lrcp",
    *,
    text_embeds: Sequence[Tensor | None] | None = None,
    grids: Sequence[tuple[int, int, int] | None] | None = None,
    **options: Any,
) -> list[Tensor]:
    """Score several media items (same D, possibly different N) in one call.

    Result ``i`` equals ``select_tokens(features[i], num_keep[i], method, ...)``. Items are
    grouped into padded buckets of similar N; each bucket is scored with batched tensor ops.
    """
    spec = get_method(method, INPUT)
    opts = make_options(method, options)
    batch = _validate(features, num_keep, text_embeds, grids, single=False)
    if batch.size == 0:
        return []
    return _run(spec, batch, opts)


@torch.no_grad()
def select_tokens(
    features: Tensor,
    num_keep: int,
    method: str = "lrcp",
    *,
    text_embeds: Tensor | None = None,
    grid: tuple[int, int, int] | None = None,
    **options: Any,
) -> Tensor:
    """Indices of the ``num_keep`` tokens of ``features`` (N, D) to keep, ascending int64.

    ``text_embeds`` (M, D): prompt text embeddings in the same space (used by ``resprune`` and
    ``cdpruner``). ``grid`` (t, h, w) with ``t*h*w == N``: token layout (used by ``uniform``).
    ``options``: method options, see :func:`method_options`. Raises ValueError on bad input.
    """
    spec = get_method(method, INPUT)
    opts = make_options(method, options)
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    batch = _validate([features], [num_keep], [text_embeds], [grid], single=True)
    return _run(spec, batch, opts)[0]
