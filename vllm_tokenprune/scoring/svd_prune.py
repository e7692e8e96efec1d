"""SVD-Prune: keep the tokens with the largest statistical leverage on the top singular vectors
(pure torch, no vLLM).

Reading of the paper: decompose the token matrix ``X = U S V^T`` and keep the k tokens with the
largest rank-r leverage scores ``l_i = ||U[i, :r]||^2 = sum_j (x_i . v_j)^2 / s_j^2``, i.e. the
tokens that contribute most to the dominant directions. LRCP is the opposite end of the same axis
(it keeps what the dominant subspace does *not* explain).

Choices where the paper is silent (options in :class:`SVDPruneOptions`):

* ``center = False`` by default: the paper decomposes the token matrix itself. With centring the
  leverage scores become Mahalanobis-like outlier scores inside the top-r subspace.
* ``rank = 16`` by default (``energy``/``max_rank`` for an adaptive r, as in LRCP).
* Singular directions whose energy is below ``1e-6`` of the largest are dropped before dividing by
  ``s_j^2`` (numerically null directions of rank-deficient inputs would otherwise amplify
  rounding noise); an all-zero item scores all tokens 0 and keeps the lowest indices, and so
  does an item with no more tokens than kept directions (all its leverage scores are equal).
* The top singular directions come from the same seeded randomized subspace iteration as LRCP
  (:mod:`._subspace`), with the optional token subsample (scores are then computed for every
  token against singular values estimated on the subsample; a uniform scale, ranking unchanged).

Batched: one padded ``(B, N_max, D)`` buffer for all items (padding + masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, select_top
from vllm_tokenprune.scoring._registry import option, register_method
from vllm_tokenprune.scoring._subspace import SubspaceOptions, principal_subspace

__all__ = ["SVDPruneOptions", "leverage_scores"]

_NULL_TOL = 1e-6


@dataclass(frozen=True)
class SVDPruneOptions(SubspaceOptions):
    """Options of ``svd_prune``: the shared subspace options, centring off by default."""

    center: bool = option(
        False, "Subtract the per-item mean token first (default off: plain SVD as in the paper)."
    )


def leverage_scores(batch: Batch, opts: SVDPruneOptions) -> tuple[Tensor, Tensor]:
    """Rank-r leverage scores ``(B, N_max)`` and the valid-row mask."""
    sp = principal_subspace(batch, opts)
    lam = sp.energies
    keep = sp.active & (lam > _NULL_TOL * lam[:, :1]) & (lam > 0)
    inv = torch.where(keep, 1.0 / lam.clamp_min(1e-30), torch.zeros_like(lam))
    coeff = torch.bmm(sp.x, sp.basis)
    scores = coeff.square().mul_(inv[:, None, :]).sum(-1)
    # An item with no more tokens than kept directions (N <= r; centred: N - 1 <= r) has every
    # leverage score equal (1, centred 1 - 1/N) but for rounding: a tie, which goes to the
    # lowest indices like any other, instead of to rounding noise.
    tied = keep.sum(-1, keepdim=True).float() >= batch.counts() - float(opts.center)
    return torch.where(tied, torch.ones_like(scores), scores), sp.mask


@register_method(
    "svd_prune",
    options=SVDPruneOptions,
    summary="largest leverage score on the top-r singular vectors",
)
def svd_prune(batch: Batch, opts: SVDPruneOptions) -> list[Tensor]:
    scores, mask = leverage_scores(batch, opts)
    return select_top(scores, mask, batch.num_keep)
