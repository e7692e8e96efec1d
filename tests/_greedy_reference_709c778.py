"""Frozen copy of the greedy scorer loops as they were before issue 17 (commit 709c778).

Only used by ``tests/test_scoring_greedy_frozen.py``, which checks that today's loops
(``vllm_tokenprune/scoring/_greedy.py``, ``divprune.py``) pick exactly the same tokens, next to the
older copy in ``tests/_greedy_reference.py`` (commit 5487d03). Do not edit.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ZERO_TOL = 1e-5
_DIST_TOL = 1e-6


def matvec(x: Tensor, v: Tensor) -> Tensor:
    if x.device.type == "cpu":
        if x.shape[0] == 1:
            return torch.mv(x[0], v[0])[None]
        return torch.stack([torch.mv(x[i], v[i]) for i in range(x.shape[0])])
    return torch.bmm(x, v[:, :, None])[:, :, 0]


class ItemMatrix:
    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.items = list(x.unbind(0)) if x.device.type == "cpu" else None

    def mv(self, v: Tensor) -> Tensor:
        if self.items is None:
            return torch.bmm(self.x, v[:, :, None])[:, :, 0]
        if len(self.items) == 1:
            return torch.mv(self.items[0], v[0])[None]
        return torch.stack([torch.mv(m, v[i]) for i, m in enumerate(self.items)])


def residual_greedy(x: Tensor, weights: Tensor | None, mask: Tensor, k_max: int) -> Tensor:
    b, n, s = x.shape
    dev = x.device
    rows = torch.arange(b, device=dev)[:, None]
    xm = ItemMatrix(x)
    energy0 = torch.linalg.vector_norm(x, dim=-1).square()
    floor = _ZERO_TOL * energy0
    res = energy0.clone()
    pen = torch.zeros(b, n, device=dev).masked_fill_(~mask, float("-inf"))
    basis = torch.zeros(b, k_max, s, dtype=x.dtype, device=dev)
    picks = []
    for t in range(k_max):
        if t > 0:
            done = (res + pen).amax(dim=-1, keepdim=True) <= 0
            res = torch.where(done, energy0, res)
            basis[:, :t].masked_fill_(done[:, :, None], 0.0)
        score = res + pen if weights is None else res * weights + pen
        j = score.argmax(dim=-1, keepdim=True)
        picks.append(j)
        pen.scatter_(1, j, float("-inf"))
        v = x[rows, j][:, 0]
        if t > 0:
            q_prev = basis[:, :t]
            for _ in range(2):
                coef = matvec(q_prev, v)
                v = v - matvec(q_prev.transpose(1, 2), coef)
        nrm2 = v.square().sum(-1, keepdim=True)
        scale = torch.where(nrm2 > floor.gather(1, j), nrm2.clamp_min(1e-30).rsqrt(), 0.0)
        q = torch.mul(v, scale, out=basis[:, t])
        res = res - xm.mv(q).square()
        res = torch.where(res > floor, res, 0.0)
    return torch.cat(picks, dim=1)


def max_min_greedy(x_unit: Tensor, mask: Tensor, k_max: int, start: str) -> Tensor:
    b, n, _ = x_unit.shape
    dev = x_unit.device
    rows = torch.arange(b, device=dev)[:, None]
    xm = ItemMatrix(x_unit)
    if start == "first":
        j = torch.zeros(b, 1, dtype=torch.int64, device=dev)
    else:
        total = x_unit.sum(dim=1, keepdim=True)
        align = torch.bmm(x_unit, total.transpose(1, 2))[:, :, 0]
        j = align.masked_fill(~mask, float("inf")).argmin(dim=-1, keepdim=True)
    min_dist = torch.full((b, n), float("inf"), device=dev).masked_fill_(~mask, -1.0)
    picks = []
    for t in range(k_max):
        if t > 0:
            j = min_dist.argmax(dim=-1, keepdim=True)
        picks.append(j)
        cos = xm.mv(x_unit[rows, j][:, 0])
        dist = torch.nn.functional.threshold(1.0 - cos, _DIST_TOL, 0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist.scatter_(1, j, -1.0)
    return torch.cat(picks, dim=1)
