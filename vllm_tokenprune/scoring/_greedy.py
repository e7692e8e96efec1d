"""Batched weighted residual-greedy selection (shared by ResPrune and CDPruner).

Given rows ``x_i`` (``(B, N, s)`` float32, padded rows zero) and positive weights ``w_i``, pick
``k`` rows one at a time::

    res_i = ||x_i||^2                                  # residual energy w.r.t. span(picked)
    repeat k times:
        j = argmax over unpicked i of  w_i * res_i     # first index on ties
        q = (x_j - Q Q^T x_j) / ||.||                  # Gram-Schmidt, applied twice
        res_i -= (x_i . q)^2  for all i;  Q <- [Q, q]

With ``w = 1`` this is greedy column-subset selection, i.e. the pivot order of column-pivoted
QR of ``X^T``. It is also exactly the fast greedy MAP inference for a DPP with the low-rank kernel
``L = diag(sqrt(w)) X X^T diag(sqrt(w))`` (Chen et al., 2018): their incremental-Cholesky row of
step t is ``e_i = (L_ij - <c_i, c_j>) / d_j = sqrt(w_i) * x_i . q``, and ``d_i^2 = w_i res_i``.
Keeping the orthonormal directions ``Q`` (``k x s``) instead of the Cholesky rows (``k x N``)
gives the same numbers without ever forming the ``N x N`` kernel, and needs less memory.

Degenerate cases: a residual below ``1e-5`` of the row's own energy counts as zero. When every
unpicked row of an item is explained (the picked rows span everything: rank-deficient inputs, or
more picks than the sketch width), the residuals of that item restart from the full energies and
the basis is cleared, i.e. a new greedy round starts over the remaining rows. On ties (including
all-zero scores) the lowest index wins, so the result is deterministic.

Cost per step: one ``(N, s)`` mat-vec plus ``O(t s)`` for the orthogonalisation; all items of the
batch advance together (one loop over steps, batched ops over items); no host synchronisation in
the loop (indices stay on the device as tensors).

Launches: an eager step issues 28 kernel-launching operators (5 mat-vecs, the Gram-Schmidt
updates, the normalisation, the residual update, the restart test, the argmax). Identical picks
need at least 16 of them: 13-14 distinct roundings, the argmax and the row gather, since no fused
torch operator (``addmv``, ``baddbmm``, ``addcmul`` with a product, ``bmm`` for ``mv``) reproduces
two of the roundings bit for bit (measured; see ``docs/scorers.md``). So on CUDA the whole loop is
captured once per input shape and replayed as one CUDA graph (:mod:`._graphs`): the same kernels,
so the same picks, without a launch per operator. On the CPU it runs eagerly; a single item runs
on plain 2-D tensors (no batch views), a batch with one ``mv`` per item (faster there than ``bmm``
with a vector).
Worker process (wherever the scorers run); pure torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import gaussian_matrix
from vllm_tokenprune.scoring._graphs import run_graphed

__all__ = ["matvec", "one_item", "pick_rows", "residual_greedy", "sketch"]

_ZERO_TOL = 1e-5


def matvec(a: Tensor, v: Tensor) -> Tensor:
    """``(..., M, s) x (..., s) -> (..., M)``: ``mv`` for one item (2-D), one ``bmm`` for a batch
    on accelerators, a loop of ``mv`` over a batch on the CPU (2-3x faster there than a ``bmm``
    with a vector right-hand side). The CPU kernels are the ones the picks were pinned with."""
    if a.dim() == 2:
        return torch.mv(a, v)
    if a.device.type == "cpu":
        return torch.stack([torch.mv(m, u) for m, u in zip(a.unbind(0), v.unbind(0), strict=True)])
    return torch.bmm(a, v[..., None])[..., 0]


def pick_rows(x: Tensor, j: Tensor) -> Tensor:
    """Row ``j[..., 0]`` of each item: ``(..., N, s)``, ``(..., 1)`` -> ``(..., s)``."""
    return x.take_along_dim(j[..., None], dim=-2).squeeze(-2)


def one_item(x: Tensor) -> bool:
    """Run on the item's 2-D tensors: a single item on the CPU, where the per-item views of the
    batched layout would be most of the operators of a step."""
    return x.device.type == "cpu" and x.shape[0] == 1


def sketch(x: Tensor, dim: int, seed: int) -> Tensor:
    """Seeded Gaussian random projection of the last axis to ``dim`` (no-op when ``dim`` is 0 or
    not smaller than the width). Inner products are preserved in expectation (JL)."""
    d = x.shape[-1]
    if dim <= 0 or dim >= d:
        return x
    proj = gaussian_matrix(d, dim, seed, x.device) * (1.0 / math.sqrt(dim))
    return torch.matmul(x, proj)


def residual_greedy(x: Tensor, weights: Tensor | None, mask: Tensor, k_max: int) -> Tensor:
    """Pick order ``(B, k_max)`` of the weighted residual greedy (see module docstring).

    Rows beyond an item's own budget can be ignored by the caller (the first ``k`` picks of a
    run with a larger ``k_max`` equal the picks of a run with ``k_max = k``).
    """
    if one_item(x):
        w = None if weights is None else weights[0]
        return _residual_loop(x[0], w, mask[0], k_max)[None]
    return run_graphed(_residual_loop, (x, weights, mask), k_max)


def _residual_loop(x: Tensor, weights: Tensor | None, mask: Tensor, k_max: int) -> Tensor:
    """The loop on ``(N, s)`` (one item) or ``(B, N, s)`` tensors; ``(..., k_max)`` picks."""
    *lead, _, s = x.shape
    energy0 = torch.linalg.vector_norm(x, dim=-1).square()
    floor = _ZERO_TOL * energy0
    # res: residual energy, set to 0 once at or below the floor (it only falls until a restart,
    # so the clamp gives the same gains and the same "explained" test as the unclamped value).
    res = energy0.clone()
    pen = torch.zeros_like(res).masked_fill_(~mask, float("-inf"))  # -inf: not pickable
    basis = x.new_zeros(*lead, k_max, s)
    picks = []
    for t in range(k_max):
        if t > 0:  # the previous pick explained every pickable row: restart a new round
            done = (res + pen).amax(dim=-1, keepdim=True) <= 0
            res = torch.where(done, energy0, res)
            basis[..., :t, :].masked_fill_(done[..., None], 0.0)  # forget the last round's basis
        # pen + res * w: pen is 0 or -inf, so even a fused multiply-add rounds like res * w
        score = res + pen if weights is None else torch.addcmul(pen, res, weights)
        j = score.argmax(dim=-1, keepdim=True)  # (..., 1): first index on ties
        picks.append(j)
        pen.scatter_(-1, j, float("-inf"))
        v = pick_rows(x, j)
        if t > 0:
            q_prev = basis[..., :t, :]
            q_prev_t = q_prev.mT
            for _ in range(2):  # "twice is enough" re-orthogonalisation
                v = v - matvec(q_prev_t, matvec(q_prev, v))
        nrm2 = v.square().sum(-1, keepdim=True)
        scale = torch.where(nrm2 > floor.gather(-1, j), nrm2.clamp_min(1e-30).rsqrt(), 0.0)
        q = torch.mul(v, scale, out=basis[..., t, :])
        res = res - matvec(x, q).square()
        res = torch.where(res > floor, res, 0.0)
    return torch.cat(picks, dim=-1)
