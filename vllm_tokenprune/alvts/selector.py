"""ALVTS token selector: which of an item's visual tokens go through a decoder layer.

Pure torch and model-agnostic (no vLLM, no transformers); runs wherever the model runs (the
worker in vLLM, the caller's process for the transformers reference). Built once per routed
layer from the layer's own weights, used at every prefill on the residual-stream hidden states
of one media item's visual tokens. See ``docs/alvts.md`` for the method and every choice made
here (and the overlap and cost tables that chose them).

The layer's attention logit between a query token ``i`` and a key token ``j`` in query head
``h`` (key/value group ``g = h // (H / G)``, GQA) is, without rotary embeddings::

    q_h(i) . k_g(j) / sqrt(d),   q_h = Wq_h x_i + bq_h,   k_g = Wk_g x_j (+ bk_g)

where ``x = rmsnorm(h) * gamma`` is the layer's input norm (gamma is folded into the weights).
The key bias only adds terms constant over keys, which cancel in the softmax: dropped exactly.
Write ``Wk_g^T = Q_g R_g`` (thin QR, ``Q_g`` (D, d) orthonormal): ``k_g = R_g^T z`` with
``z = Q_g^T x``, so the logit is ``u_h(i) . z(j) / sqrt(d)`` with ``u_h = R_g q_h``. The selector
keeps a rank-``r`` subspace ``P_g`` (d, r) of ``z`` shared by the query heads of the group: the
top-``r`` eigenvectors of ``sum_h E[u_h u_h^T] = sum_h (R_g Wq_h Wq_h^T R_g^T + R_g bq_h bq_h^T
R_g^T)`` (unit-variance isotropic ``x``), which minimises the expected squared logit error of
the group's heads; keys are projected once per group (``x Q_g P_g``), queries per head
(``(Wq_h x + bq_h) R_g^T P_g / sqrt(d)``: scale and query bias folded in). For one head per group
this is the best rank-``r`` approximation (truncated SVD) of ``Wq_h^T Wk_g``; at ``r = d`` it is
exact. Rotary embeddings are not applied: the selector scores content, not relative position.

Importance of token ``j`` at layer ``l``: the attention it receives from a fixed, small set of
the item's own tokens used as queries (``num_queries`` rows evenly strided over the item: the
centres of equal segments; every row when the item is smaller), with the softmax over the
item's keys, not causally masked, summed over heads and queries, normalised to sum 1. Only the
item's own rows are read, so the result does not depend on what else shares a prefill step,
how the prompt is chunked around the item, or what follows it.

Cost per key token (the item's N rows): one projection ``x_j K`` (``2 D G r`` FLOPs, in the
factors' dtype: the model's), ``2 M H r`` FLOPs of float32 logits and an ``M H`` softmax
column; plus ``2 M D H r`` once for the ``M`` query rows. Memory: the projected keys (``N G r``
floats) and logits in blocks of at most ``_BLOCK_ELEMS`` floats (``_BLOCK_ELEMS_ACCEL`` off the
CPU; whole softmax rows, so one pass; a single row of ``N`` when ``N`` exceeds the block).
The RMSNorm is a per-row scale, applied to the projected rows (``rmsnorm(h) K = (h K) /
rms(h)``), never to an ``N x D`` copy.

Consistency: ``s_l = (1 - w) * a_l + w * s_prev`` with ``s_prev`` the previous routed layer's
``s``. The ``num_process`` tokens of largest ``s_l`` go through the layer (ties: lowest index).
No host synchronisation anywhere: shapes and options are host values; selection is by sort
order (no boolean masks, ``nonzero`` or ``.item()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QKFactors", "auto_rank", "combine", "importance", "layer_factors", "query_rows",
           "split_tokens", "top_tokens"]

#: Automatic rank: the key projection (``G * rank`` columns) at most ``hidden / 8`` columns.
AUTO_RANK_DIVISOR = 8

#: Float32 logits held at once (whole softmax rows of one block). On CPUs 1 MiB, meant to keep
#: the block's logits, softmax and sum in cache (on this shared 2-core machine block sizes from
#: 2^16 to 2^22 measured alike, within the noise); on accelerators 64 MiB: few kernel launches.
_BLOCK_ELEMS = 1 << 18
_BLOCK_ELEMS_ACCEL = 1 << 24


@dataclass(frozen=True)
class QKFactors:
    """Low-rank query-key factors of one decoder layer, in the model's dtype, on its device.

    ``query``: (D, H*r), gamma and 1/sqrt(head_dim) folded in (head ``h`` in columns
    ``h*r:(h+1)*r``); ``query_bias``: (H*r,) float32 or None; ``key``: (D, G*r), gamma folded in (KV
    group ``g`` in columns ``g*r:(g+1)*r``, shared by heads ``g*H/G .. (g+1)*H/G - 1``).
    ``eps``: the input RMSNorm's epsilon.
    """

    query: Tensor
    query_bias: Tensor | None
    key: Tensor
    num_heads: int
    rank: int
    eps: float

    @property
    def num_kv_heads(self) -> int:
        return int(self.key.shape[1]) // self.rank

    @property
    def hidden_size(self) -> int:
        return int(self.query.shape[0])

    def head_logit_matrix(self, head: int) -> Tensor:
        """(D, D) float64 ``L_h R_g^T`` (scale included) of one head, bias left out: tests."""
        r = self.rank
        g = head // (self.num_heads // self.num_kv_heads)
        left = self.query[:, head * r:(head + 1) * r].double()
        right = self.key[:, g * r:(g + 1) * r].double()
        return left @ right.T


def auto_rank(hidden_size: int, num_kv_heads: int, head_dim: int) -> int:
    """The default rank: the largest with ``num_kv_heads * rank <= hidden_size / 8`` (the
    selector's key projection costs at most 1/8 of a ``D x D`` matmul per token), capped at
    ``head_dim``, at least 1. E.g. 32 for the ``mid`` preset (1024, 4 KV heads), 112 for
    Qwen2.5-VL-7B (3584, 4), 16 for LLaVA-1.5-7B (4096, 32: no GQA)."""
    return max(1, min(head_dim, hidden_size // (AUTO_RANK_DIVISOR * num_kv_heads)))


@torch.no_grad()
def layer_factors(
    q_weight: Tensor,
    k_weight: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    rank: int | None,
    q_bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> QKFactors:
    """Factors of one layer from its weights (as ``nn.Linear`` stores them).

    ``q_weight`` (H*d, D), ``k_weight`` (G*d, D), ``q_bias`` (H*d,) or None, ``norm_weight``
    (D,) the input RMSNorm's gamma (None: no gamma). ``rank`` is capped at ``d`` (None:
    :func:`auto_rank`). The key bias is
    not needed (it only adds query-dependent constants). Computed in float64, stored in
    ``dtype`` (default: the weights' dtype) on the weights' device. Passing ``k_weight``
    repeated per query head (``num_kv_heads = num_heads``) gives each head its own subspace
    (per-head truncated SVD; ``H / G`` times the key projection's cost).
    """
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    hd, dim = q_weight.shape
    if hd % num_heads:
        raise ValueError(f"q_weight rows ({hd}) are not a multiple of num_heads ({num_heads})")
    d = hd // num_heads
    if tuple(k_weight.shape) != (num_kv_heads * d, dim):
        raise ValueError(f"k_weight has shape {tuple(k_weight.shape)}, expected "
                         f"{(num_kv_heads * d, dim)}")
    r = min(auto_rank(dim, num_kv_heads, d) if rank is None else rank, d, dim)
    wq = q_weight.detach().to(torch.float64)
    wk = k_weight.detach().to(torch.float64)
    if norm_weight is not None:
        g = norm_weight.detach().to(torch.float64)
        wq = wq * g
        wk = wk * g
    group = num_heads // num_kv_heads
    wq = wq.view(num_kv_heads, group, d, dim)
    qk, rk = torch.linalg.qr(wk.view(num_kv_heads, d, dim).transpose(1, 2))  # (G,D,d), (G,d,d)
    c = rk.unsqueeze(1) @ wq  # (G, group, d, D): u_h = c_h x + rk bq_h
    second = (c @ c.transpose(2, 3)).sum(1)  # (G, d, d)
    ub = None
    if q_bias is not None:
        bq = q_bias.detach().to(torch.float64).view(num_kv_heads, group, d, 1)
        ub = rk.unsqueeze(1) @ bq  # (G, group, d, 1)
        second = second + (ub @ ub.transpose(2, 3)).sum(1)
    _, vecs = torch.linalg.eigh(second)  # ascending eigenvalues
    p = vecs[:, :, d - r:].flip(-1)  # (G, d, r): the top-r subspace, largest first
    scale = float(d) ** -0.5
    key = qk @ p  # (G, D, r)
    query = (p.transpose(1, 2).unsqueeze(1) @ c).transpose(2, 3) * scale  # (G, group, D, r)
    dev = q_weight.device
    dtype = dtype or q_weight.dtype
    query_bias = None
    if ub is not None:
        query_bias = ((p.transpose(1, 2).unsqueeze(1) @ ub) * scale).reshape(-1)
        query_bias = query_bias.to(dev, torch.float32).contiguous()
    return QKFactors(
        query=query.reshape(num_heads, dim, r).permute(1, 0, 2).reshape(dim, -1)
        .to(dev, dtype).contiguous(),
        query_bias=query_bias,
        key=key.permute(1, 0, 2).reshape(dim, -1).to(dev, dtype).contiguous(),
        num_heads=num_heads,
        rank=r,
        eps=float(eps),
    )


def query_rows(num_tokens: int, num_queries: int | None, device: torch.device | None = None
               ) -> Tensor:
    """Ascending int64 rows of the item used as queries: the centres of ``num_queries`` equal
    segments of ``[0, num_tokens)``; every row when ``num_queries`` is None or >= the count."""
    if num_queries is None or num_queries >= num_tokens:
        return torch.arange(num_tokens, dtype=torch.int64, device=device)
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    i = torch.arange(num_queries, dtype=torch.int64, device=device)
    return ((2 * i + 1) * num_tokens) // (2 * num_queries)


def _inv_rms(h: Tensor, eps: float) -> Tensor:
    """(N,) float32 ``1 / sqrt(mean(h^2) + eps)`` per row."""
    ss = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)
    return torch.rsqrt(ss * ss / h.shape[-1] + eps)


@torch.no_grad()
def importance(hidden: Tensor, factors: QKFactors, num_queries: int | None = None, *,
               query_states: Tensor | None = None,
               reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Approximate attention each of an item's N tokens receives.

    ``hidden`` (N, D): residual-stream states entering the layer (before its input norm), the
    keys. Queries: ``num_queries`` rows of ``hidden`` (:func:`query_rows`; None: every row), or
    ``query_states`` (M, D) given explicitly (benchmarks). The softmax runs over the item's keys,
    unmasked. Returns (N,) float32 summing to 1.

    ``reduce``: sums the (N,) attention received over the KV groups of every shard before it is
    normalised (tensor parallelism: ``factors`` hold this rank's KV groups, built with the
    full model's rank, and ``reduce`` all-reduces across the group), so every rank gets the
    same score.
    """
    dim = factors.hidden_size
    if hidden.dim() != 2 or hidden.shape[1] != dim:
        raise ValueError(f"hidden must be (N, {dim}), got {tuple(hidden.shape)}")
    n = int(hidden.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    heads, kv, r = factors.num_heads, factors.num_kv_heads, factors.rank
    group = heads // kv
    h = hidden.to(factors.key.dtype)
    inv = _inv_rms(hidden, factors.eps)
    # keys: (G, r, N) float32, the norm's row scale applied after the projection
    keys = (h @ factors.key).float().mul_(inv.unsqueeze(1))
    keys = keys.view(n, kv, r).permute(1, 2, 0).contiguous()
    if query_states is None:
        rows = query_rows(n, num_queries, hidden.device)
        hq, inv_q = h.index_select(0, rows), inv.index_select(0, rows)
    else:
        hq = query_states.to(factors.query.dtype)
        inv_q = _inv_rms(query_states, factors.eps)
    m = int(hq.shape[0])
    qs = (hq @ factors.query).float().mul_(inv_q.unsqueeze(1))
    if factors.query_bias is not None:
        qs += factors.query_bias
    # (G, group*M, r): each group's heads' query rows against the group's keys
    qs = qs.view(m, kv, group, r).permute(1, 2, 0, 3).reshape(kv, group * m, r)
    received = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    block = _BLOCK_ELEMS if hidden.device.type == "cpu" else _BLOCK_ELEMS_ACCEL
    rows_per_block = max(1, block // n)
    groups_per_block = max(1, rows_per_block // (group * m))
    step = min(group * m, rows_per_block)
    for g0 in range(0, kv, groups_per_block):
        g1 = min(kv, g0 + groups_per_block)
        for q0 in range(0, group * m, step):
            logits = torch.bmm(qs[g0:g1, q0:q0 + step], keys[g0:g1])
            received += logits.softmax(-1).sum(dim=(0, 1))
    if reduce is not None:
        received = reduce(received)
    return received / received.sum()


def combine(current: Tensor, previous: Tensor | None, consistency: float) -> Tensor:
    """Importance-consistency blend ``(1 - w) * current + w * previous`` (``previous`` None:
    ``current``)."""
    if previous is None or consistency == 0.0:
        return current
    return (1.0 - consistency) * current + consistency * previous


def _check_count(n: int, num_process: int) -> None:
    if not 0 <= num_process <= n:
        raise ValueError(f"num_process must be in [0, {n}], got {num_process}")


def top_tokens(score: Tensor, num_process: int) -> Tensor:
    """Ascending int64 indices of the ``num_process`` largest scores (ties: lowest index)."""
    n = int(score.shape[0])
    _check_count(n, num_process)
    if num_process == n:
        return torch.arange(n, dtype=torch.int64, device=score.device)
    order = torch.sort(score.to(torch.float32), descending=True, stable=True).indices
    return order[:num_process].sort().values.to(torch.int64)


def split_tokens(score: Tensor, num_process: int) -> tuple[Tensor, Tensor]:
    """(through, skipped): ascending int64 indices of the ``num_process`` largest scores (ties:
    lowest index) and of the others, from one sort (no boolean mask)."""
    n = int(score.shape[0])
    _check_count(n, num_process)
    order = torch.sort(score.to(torch.float32), descending=True, stable=True).indices
    return (order[:num_process].sort().values.to(torch.int64),
            order[num_process:].sort().values.to(torch.int64))
