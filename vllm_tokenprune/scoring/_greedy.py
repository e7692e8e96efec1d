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
the loop (indices stay on the device as tensors). Launch count: the step keeps running state
instead of recomputing it -- residuals already clamped at the floor, picked tokens as a ``-inf``
penalty row, the basis cleared in place on a restart (``masked_fill_``) instead of re-masked
every step -- so a step issues 29 kernel-launching operators at B = 1 (37 before) and, on a GPU,
the same number whatever the batch size (the CPU runs one ``mv`` per item), see
``docs/scorers.md`` (``benchmarks/count_ops.py``). The arithmetic on the numbers (mat-vec kernels,
order of operations) is unchanged, so the picks are identical to the previous loop (tested against
a frozen copy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import gaussian_matrix

__all__ = ["matvec", "residual_greedy", "sketch"]

_ZERO_TOL = 1e-5


def matvec(x: Tensor, v: Tensor) -> Tensor:
    """Batched mat-vec ``(B, N, s) x (B, s) -> (B, N)``.

    One ``bmm`` on accelerators (one launch for all items); on the CPU a loop of ``mv`` over the
    items, which is 2-3x faster than a CPU ``bmm`` with a vector right-hand side.
    """
    if x.device.type == "cpu":
        if x.shape[0] == 1:
            return torch.mv(x[0], v[0])[None]
        return torch.stack([torch.mv(x[i], v[i]) for i in range(x.shape[0])])
    return torch.bmm(x, v[:, :, None])[:, :, 0]


class ItemMatrix:
    """A fixed ``(B, N, s)`` operand of many :func:`matvec` calls, split into per-item views once
    (the CPU path), so each call issues only the ``mv``/``bmm`` itself."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.items = list(x.unbind(0)) if x.device.type == "cpu" else None

    def mv(self, v: Tensor) -> Tensor:
        """``(B, s) -> (B, N)``, same kernels as :func:`matvec`."""
        if self.items is None:
            return torch.bmm(self.x, v[:, :, None])[:, :, 0]
        if len(self.items) == 1:
            return torch.mv(self.items[0], v[0])[None]
        return torch.stack([torch.mv(m, v[i]) for i, m in enumerate(self.items)])


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
    b, n, s = x.shape
    dev = x.device
    rows = torch.arange(b, device=dev)[:, None]
    xm = ItemMatrix(x)
    energy0 = torch.linalg.vector_norm(x, dim=-1).square()
    floor = _ZERO_TOL * energy0
    # res: residual energy, set to 0 once at or below the floor (it only falls until a restart,
    # so the clamp gives the same gains and the same "explained" test as the unclamped value).
    res = energy0.clone()
    pen = torch.zeros(b, n, device=dev).masked_fill_(~mask, float("-inf"))  # -inf: not pickable
    basis = torch.zeros(b, k_max, s, dtype=x.dtype, device=dev)
    picks = []
    for t in range(k_max):
        if t > 0:  # the previous pick explained every pickable row: restart a new round
            done = (res + pen).amax(dim=-1, keepdim=True) <= 0
            res = torch.where(done, energy0, res)
            basis[:, :t].masked_fill_(done[:, :, None], 0.0)  # forget the last round's basis
        score = res + pen if weights is None else res * weights + pen
        j = score.argmax(dim=-1, keepdim=True)  # (B, 1): first index on ties
        picks.append(j)
        pen.scatter_(1, j, float("-inf"))
        v = x[rows, j][:, 0]
        if t > 0:
            q_prev = basis[:, :t]
            for _ in range(2):  # "twice is enough" re-orthogonalisation
                coef = matvec(q_prev, v)
                v = v - matvec(q_prev.transpose(1, 2), coef)
        nrm2 = v.square().sum(-1, keepdim=True)
        scale = torch.where(nrm2 > floor.gather(1, j), nrm2.clamp_min(1e-30).rsqrt(), 0.0)
        q = torch.mul(v, scale, out=basis[:, t])
        res = res - xm.mv(q).square()
        res = torch.where(res > floor, res, 0.0)
    return torch.cat(picks, dim=1)
