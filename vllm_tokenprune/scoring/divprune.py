"""DivPrune: greedy max-min diversity (farthest-point selection) on cosine distance (pure torch,
no vLLM).

``d(i, j) = 1 - cos(x_i, x_j)`` (in [0, 2]). The kept set is grown greedily: each step adds the
token whose distance to its *nearest* already-kept token is largest (the classic 2-approximation
of the max-min diversity problem), so the kept set's minimum pairwise distance is as large as the
greedy can make it.

Start token (the paper leaves room here; option ``start``):

* ``"farthest"`` (default): the token with the largest total cosine distance to all tokens,
  ``argmax_i sum_j (1 - cos(x_i, x_j)) = argmin_i x_unit_i . sum_j x_unit_j``, i.e. the token
  least aligned with the mean direction: the most atypical token, found in O(N D).
* ``"first"``: token 0 (the top-left patch), the cheapest and fully content-independent start.

Distances below ``1e-6`` count as 0 (identical tokens tie exactly); ties go to the lowest index.
``sketch_dim`` (default 0 = exact) optionally runs on a random projection of the unit-norm tokens,
trading exactness for an ``s/D`` cheaper step.

Batched: all items advance through one greedy loop (``padded-greedy``); per step one batched
mat-vec ``O(N D)`` and 7 kernel-launching operators, no host synchronisation; on CUDA the
loop is replayed as one CUDA graph once an input shape repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, prefix_sorted
from vllm_tokenprune.scoring._graphs import run_graphed
from vllm_tokenprune.scoring._greedy import matvec, one_item, pick_rows, sketch
from vllm_tokenprune.scoring._registry import option, register_method

__all__ = ["DivPruneOptions", "max_min_greedy"]

_DIST_TOL = 1e-6


@dataclass(frozen=True)
class DivPruneOptions:
    """Options of ``divprune``."""

    start: Literal["farthest", "first"] = option(
        "farthest", "First token: largest total cosine distance to all tokens, or token 0."
    )
    sketch_dim: int = option(
        0, "Random-projection width of the hidden dimension (0 = exact cosine distances).", ge=0
    )
    seed: int = option(0, "Seed of the random projection.", ge=0)


def max_min_greedy(x_unit: Tensor, mask: Tensor, k_max: int, start: str) -> Tensor:
    """Pick order ``(B, k_max)`` of farthest-point selection on ``1 - x_unit x_unit^T``.

    On CUDA the loop is replayed from a CUDA graph once its input shape repeats (:mod:`._graphs`);
    on the CPU a single item runs on its 2-D tensors.
    """
    b = x_unit.shape[0]
    if start == "first":
        first = torch.zeros(b, 1, dtype=torch.int64, device=x_unit.device)
    else:
        total = x_unit.sum(dim=1, keepdim=True)  # padded rows are zero
        align = torch.bmm(x_unit, total.transpose(1, 2))[:, :, 0]
        first = align.masked_fill(~mask, float("inf")).argmin(dim=-1, keepdim=True)
    if one_item(x_unit):
        return _max_min_loop(x_unit[0], mask[0], first[0], k_max)[None]
    return run_graphed(_max_min_loop, (x_unit, mask, first), k_max)


def _max_min_loop(x_unit: Tensor, mask: Tensor, first: Tensor, k_max: int) -> Tensor:
    """The loop on ``(N, s)`` (one item) or ``(B, N, s)`` tensors; ``(..., k_max)`` picks.

    Running state: ``min_dist`` holds each token's distance to its nearest kept token and -1 for
    tokens that cannot be picked (kept or padding), so a step is argmax, one row gather, one
    mat-vec and three elementwise ops (``threshold`` zeroes distances up to the tolerance, which
    also covers the negative ones rounding can give).
    """
    min_dist = torch.full(mask.shape, float("inf"), device=mask.device).masked_fill_(~mask, -1.0)
    j = first
    picks = []
    for t in range(k_max):
        if t > 0:
            j = min_dist.argmax(dim=-1, keepdim=True)
        picks.append(j)
        cos = matvec(x_unit, pick_rows(x_unit, j))
        dist = torch.nn.functional.threshold(1.0 - cos, _DIST_TOL, 0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist.scatter_(-1, j, -1.0)
    return torch.cat(picks, dim=-1)


@register_method(
    "divprune",
    options=DivPruneOptions,
    summary="greedy max-min cosine diversity (farthest-point selection)",
    batched_kind="padded-greedy",
)
def divprune(batch: Batch, opts: DivPruneOptions) -> list[Tensor]:
    x, mask = batch.padded()
    x_unit = x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    if opts.sketch_dim:
        x_unit = sketch(x_unit, opts.sketch_dim, opts.seed)
        x_unit = x_unit / x_unit.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    order = max_min_greedy(x_unit, mask, max(batch.num_keep), opts.start)
    return prefix_sorted(order, batch.num_keep)
