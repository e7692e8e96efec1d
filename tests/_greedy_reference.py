"""Frozen copy of the greedy scorer loops as they were before issue 12 (commit 5487d03).

Only used by ``tests/test_scoring_greedy_frozen.py``, which checks that today's loops
(``vllm_tokenprune/scoring/_greedy.py``, ``divprune.py``) pick exactly the same tokens. Do not edit.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ZERO_TOL = 1e-5
_DIST_TOL = 1e-6


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


def residual_greedy(x: Tensor, weights: Tensor | None, mask: Tensor, k_max: int) -> Tensor:
    """Pick order ``(B, k_max)`` of the weighted residual greedy (see module docstring).

    Rows beyond an item's own budget can be ignored by the caller (the first ``k`` picks of a
    run with a larger ``k_max`` equal the picks of a run with ``k_max = k``).
    """
    b, n, s = x.shape
    dev = x.device
    batch_idx = torch.arange(b, device=dev)
    energy0 = torch.linalg.vector_norm(x, dim=-1).square()
    floor = _ZERO_TOL * energy0
    res = energy0.clone()
    avail = mask.clone()
    basis = torch.zeros(b, k_max, s, dtype=x.dtype, device=dev)
    active = torch.zeros(b, k_max, dtype=torch.bool, device=dev)
    order = torch.empty(b, k_max, dtype=torch.int64, device=dev)
    neg = torch.full_like(res, -1.0)
    for t in range(k_max):
        gain = torch.where(res > floor, res, torch.zeros_like(res))
        if weights is not None:
            gain = gain * weights
        j = torch.where(avail, gain, neg).argmax(dim=-1)
        order[:, t] = j
        avail[batch_idx, j] = False
        v = x[batch_idx, j]
        if t > 0:
            q_prev = basis[:, :t] * active[:, :t, None]
            for _ in range(2):  # "twice is enough" re-orthogonalisation
                coef = matvec(q_prev, v)
                v = v - matvec(q_prev.transpose(1, 2), coef)
        nrm2 = v.square().sum(-1)
        ok = nrm2 > floor[batch_idx, j]
        v = v * torch.where(ok, nrm2.clamp_min(1e-30).rsqrt(), torch.zeros_like(nrm2))[:, None]
        basis[:, t] = v
        active[:, t] = ok
        proj = matvec(x, v)
        res = res - proj.square()
        exhausted = ~(avail & (res > floor)).any(dim=-1)
        res = torch.where(exhausted[:, None], energy0, res)
        active &= ~exhausted[:, None]
    return order


def max_min_greedy(x_unit: Tensor, mask: Tensor, k_max: int, start: str) -> Tensor:
    """Pick order ``(B, k_max)`` of farthest-point selection on ``1 - x_unit x_unit^T``."""
    b, n, _ = x_unit.shape
    dev = x_unit.device
    batch_idx = torch.arange(b, device=dev)
    avail = mask.clone()
    order = torch.empty(b, k_max, dtype=torch.int64, device=dev)
    if start == "first":
        first = torch.zeros(b, dtype=torch.int64, device=dev)
    else:
        total = x_unit.sum(dim=1, keepdim=True)  # padded rows are zero
        align = torch.bmm(x_unit, total.transpose(1, 2))[:, :, 0]
        first = align.masked_fill(~mask, float("inf")).argmin(dim=-1)
    min_dist = torch.full((b, n), float("inf"), device=dev)
    neg = torch.full((b, n), -1.0, device=dev)
    j = first
    for t in range(k_max):
        if t > 0:
            j = torch.where(avail, min_dist, neg).argmax(dim=-1)
        order[:, t] = j
        avail[batch_idx, j] = False
        cos = matvec(x_unit, x_unit[batch_idx, j])
        dist = (1.0 - cos).clamp_min(0.0)
        dist = torch.where(dist > _DIST_TOL, dist, torch.zeros_like(dist))
        min_dist = torch.minimum(min_dist, dist)
    return order
