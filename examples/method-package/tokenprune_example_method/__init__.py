"""``mean_distance``: keep the visual tokens farthest from the item's mean token.

An example of a pruning method that lives in its own package and is served by vllm-tokenprune
(``prune_method="mean_distance"`` per request): the entry point in ``pyproject.toml`` names
:func:`register`, which registers the method through the public API. Everything a method
needs is there: a frozen options dataclass whose fields are declared with ``option`` (checked
when the server starts and per request), and a batched scorer that returns, per item, the
ascending indices of the ``num_keep`` tokens to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune import Batch, option, register_method

NAME = "mean_distance"


@dataclass(frozen=True)
class MeanDistanceOptions:
    """Options of ``mean_distance`` (``token_prune.options.mean_distance`` on a server)."""

    center: float = option(
        1.0, "Share of the item's mean token subtracted before measuring (0: the token norm, "
        "1: the distance to the mean).", ge=0.0, le=1.0)


def mean_distance(batch: Batch, opts: MeanDistanceOptions) -> list[Tensor]:
    """Per item: the ``num_keep`` tokens of largest ``|| x_i - center * mean(x) ||`` (ties go to
    the lowest index), in ascending order. ``batch.padded()`` gives one float32
    ``(items, N_max, D)`` buffer with zero padding and the mask of real rows."""
    x, mask = batch.padded()
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
    mean = x.sum(dim=1, keepdim=True) / counts[:, :, None]
    scores = torch.linalg.vector_norm(x - opts.center * mean, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return [order[b, :k].sort().values for b, k in enumerate(batch.num_keep)]


def register() -> None:
    """The ``vllm_tokenprune.methods`` entry point: register the method (idempotent)."""
    register_method(NAME, options=MeanDistanceOptions,
                    summary="tokens farthest from the item's mean token")(mean_distance)
