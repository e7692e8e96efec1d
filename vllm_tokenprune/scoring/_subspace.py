"""Batched, seeded estimate of the dominant principal subspace (shared by LRCP and SVD-Prune;
pure torch, no vLLM).

Algorithm (randomized subspace iteration with a Rayleigh-Ritz step, all in float32):

1. ``X`` is the ``(B, N, D)`` padded token buffer (optionally centred per item; padded rows zero).
2. Optionally keep a seeded random subset of rows ``S`` (the LRCP observation: the dominant
   subspace survives dropping most tokens at random). The subset is "the rows with the smallest
   hash keys", so it is a pure function of ``(seed, N)`` and is the same on every device.
3. ``Z0 = orth(Omega)`` with ``Omega`` a seeded ``(D, l)`` Gaussian, ``l = r + oversample``.
   ``power_iters`` times: ``Z <- orth(S^T (S Z))`` (QR). No ``(D, D)`` covariance and no
   ``(N, N)`` Gram matrix is ever formed: every step is two thin matmuls, ``O(N D l)``.
4. Rayleigh-Ritz: ``G = (S Z)^T (S Z)`` is ``(l, l)``; its eigenvectors rotate ``Z`` into the
   principal directions ``V`` and its eigenvalues are the explained energies (squared singular
   values) in descending order.

Why not ``torch.svd_lowrank``: it draws from the global RNG (not seedable per call) and is
not batched. Why not an exact ``eigh`` of the ``D x D`` covariance: at ``D = 4096`` that alone
costs more than the whole randomized estimate at ``N = 16384``.

Eigenvector signs and the basis inside a degenerate eigenspace are arbitrary, but the scores
built on top (projection residuals, leverage scores) depend only on the spanned subspace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, gaussian_matrix, hash_keys, prefix_mask
from vllm_tokenprune.scoring._registry import option

__all__ = ["Subspace", "SubspaceOptions", "principal_subspace"]


@dataclass(frozen=True)
class SubspaceOptions:
    """Options shared by the PCA/SVD-based scorers."""

    rank: int = option(16, "Number r of principal directions (used when `energy` is None).", ge=1)
    energy: float | None = option(
        None,
        "If set, use per item the smallest r whose directions explain this fraction of the "
        "energy (capped at `max_rank`) instead of the fixed `rank`.",
        gt=0.0,
        le=1.0,
    )
    max_rank: int = option(64, "Upper bound on r in `energy` mode.", ge=1)
    center: bool = option(True, "Subtract the per-item mean token before the decomposition.")
    subsample: float = option(
        0.25,
        "Fraction of the tokens (seeded random subset) used to estimate the subspace when "
        "N > `subsample_above`; scores are still computed for every token. 1.0 disables.",
        gt=0.0,
        le=1.0,
    )
    subsample_above: int = option(
        4096,
        "Use all tokens for the estimate when N <= this; above it use "
        "max(`subsample_above`, ceil(`subsample` * N)) tokens (0 = always subsample).",
        ge=0,
    )
    oversample: int = option(8, "Extra random directions of the range finder (l = r + this).", ge=0)
    power_iters: int = option(
        2, "Subspace-iteration steps (each is two thin matmuls over the sampled tokens).", ge=0
    )
    seed: int = option(0, "Seed of the Gaussian test matrix and of the token subsample.", ge=0)


@dataclass
class Subspace:
    x: Tensor  # (B, N, D) float32 working buffer (centred if requested), padded rows zero
    mask: Tensor  # (B, N) bool, valid rows
    basis: Tensor  # (B, D, l) orthonormal columns, principal directions first
    energies: Tensor  # (B, l) Ritz values (explained energy per direction), descending, >= 0
    active: Tensor  # (B, l) bool: directions that belong to the chosen rank r


def _subsample_rows(x: Tensor, sizes: list[int], opts: SubspaceOptions) -> tuple[Tensor, list[int]]:
    counts = []
    for n in sizes:
        if n <= opts.subsample_above or opts.subsample >= 1.0:
            counts.append(n)
        else:
            counts.append(min(n, max(opts.subsample_above, math.ceil(opts.subsample * n))))
    if counts == sizes:
        return x, counts
    b, n_max, _ = x.shape
    keys = hash_keys(n_max, opts.seed, x.device).expand(b, n_max)
    keys = keys.masked_fill(~prefix_mask(sizes, n_max, x.device), torch.iinfo(torch.int64).max)
    m_max = max(counts)
    rows = torch.sort(keys, dim=-1, stable=True).indices[:, :m_max]
    sub = torch.gather(x, 1, rows[:, :, None].expand(b, m_max, x.shape[2]))
    sub.mul_(prefix_mask(counts, m_max, x.device)[:, :, None])
    return sub, counts


def _orth(z: Tensor) -> Tensor:
    return torch.linalg.qr(z, mode="reduced").Q


def principal_subspace(batch: Batch, opts: SubspaceOptions) -> Subspace:
    """Dominant subspace of every item of ``batch`` (see the module docstring)."""
    x, mask = batch.padded()
    sizes = batch.sizes
    d = batch.dim
    if opts.center:
        mean = x.sum(dim=1, keepdim=True) / batch.counts()[:, :, None]
        x.sub_(mean).mul_(mask[:, :, None])
    r_max = min(opts.rank if opts.energy is None else opts.max_rank, d)
    width = min(r_max + opts.oversample, d)

    sub, _ = _subsample_rows(x, sizes, opts)
    z = _orth(gaussian_matrix(d, width, opts.seed, x.device))
    z = z.expand(x.shape[0], d, width)
    for _ in range(opts.power_iters):
        z = _orth(torch.bmm(sub.transpose(1, 2), torch.bmm(sub, z)))
    w = torch.bmm(sub, z)
    evals, evecs = torch.linalg.eigh(torch.bmm(w.transpose(1, 2), w))
    evals = evals.flip(-1).clamp_min(0.0)
    basis = torch.bmm(z, evecs.flip(-1))

    cols = torch.arange(width, device=x.device)
    if opts.energy is None:
        active = (cols < r_max).expand(x.shape[0], width)
    else:
        total = sub.square().sum(dim=(1, 2)).clamp_min(1e-30)
        frac = evals.cumsum(-1) / total[:, None]
        # r = 1 + number of leading directions still short of the target fraction
        need = 1 + (frac < opts.energy * (1 - 1e-6)).sum(-1)
        active = cols < need.clamp(max=r_max)[:, None]
    return Subspace(x, mask, basis, evals, active)
