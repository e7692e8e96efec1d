"""LRCP: keep the tokens the dominant low-rank subspace explains worst (pure torch, no vLLM).

Reading of the paper (see ``shared/notes/methods.md``): centre the tokens, estimate the dominant
r-dimensional principal subspace ``V_r`` by PCA, score every token by its projection residual
energy ``s_i = || xc_i - V_r V_r^T xc_i ||^2`` and keep the k largest. The paper observes that the
dominant subspace is stable when most tokens are dropped at random, so for long inputs it is
estimated from a seeded random subset of the tokens (``subsample``/``subsample_above``); every
token is still scored.

Choices where the paper is silent (all options, see :class:`LRCPOptions`):

* ``rank = 16`` by default (fixed r keeps the cost predictable); ``energy`` switches to an
  adaptive r (smallest r explaining that fraction of the energy, capped by ``max_rank``).
* ``center = True`` (PCA), the mean token would otherwise be the first "principal" direction.
* The subspace comes from a seeded randomized subspace iteration (:mod:`._subspace`), not an exact
  eigendecomposition: ``O(N D (r + oversample))`` per step.
* The residual is computed directly (``xc - (xc V) V^T``), not as ``||xc||^2 - ||V^T xc||^2``,
  so tiny residuals are not lost to cancellation; residual norms below ``1e-5`` of the item's
  largest centred token norm count as exactly zero (ties, broken by lowest index), which makes
  rank-deficient and all-identical inputs behave deterministically.

Batched: one padded ``(B, N_max, D)`` buffer for all items (padding + masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, select_top
from vllm_tokenprune.scoring._registry import register_method
from vllm_tokenprune.scoring._subspace import SubspaceOptions, principal_subspace

__all__ = ["LRCPOptions", "lrcp_scores"]

_ZERO_TOL = 1e-10  # on squared norms, relative to the largest centred token energy


@dataclass(frozen=True)
class LRCPOptions(SubspaceOptions):
    """Options of ``lrcp`` (all inherited from the shared subspace options; ``center`` on)."""


def lrcp_scores(batch: Batch, opts: LRCPOptions) -> tuple[Tensor, Tensor]:
    """Projection-residual energies ``(B, N_max)`` and the valid-row mask."""
    sp = principal_subspace(batch, opts)
    x = sp.x
    energy0 = torch.linalg.vector_norm(x, dim=-1).square()
    v = sp.basis * sp.active[:, None, :]
    coeff = torch.bmm(x, v)
    x.baddbmm_(coeff, v.transpose(1, 2), alpha=-1.0)  # x <- residual, in place
    res = torch.linalg.vector_norm(x, dim=-1).square()
    floor = _ZERO_TOL * energy0.amax(dim=-1, keepdim=True)
    res = torch.where(res > floor, res, torch.zeros_like(res))
    return res, sp.mask


@register_method(
    "lrcp",
    options=LRCPOptions,
    summary="largest residual to the dominant PCA subspace (low-rank compressibility)",
)
def lrcp(batch: Batch, opts: LRCPOptions) -> list[Tensor]:
    scores, mask = lrcp_scores(batch, opts)
    return select_top(scores, mask, batch.num_keep)
