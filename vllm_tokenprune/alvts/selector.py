"""ALVTS token selector: which of an item's visual tokens go through a decoder layer.

Pure torch and model-agnostic (no vLLM, no transformers). Built once per routed layer from the
layer's own weights, used at every prefill on the residual-stream hidden states of one media
item's visual tokens. See ``docs/alvts.md`` for the method and every choice made here.

The layer's attention logit between a query token ``i`` and a key token ``j`` in query head
``h`` (key/value group ``g = h // (H / G)``, GQA) is, without rotary embeddings::

    (x_i Wq_h^T + bq_h) . (x_j Wk_g^T + bk_g) / sqrt(d)
        = x_i (Wq_h^T Wk_g) x_j^T / sqrt(d) + (Wk_g^T bq_h) . x_j / sqrt(d) + [terms of i only]

where ``x = rmsnorm(h) * gamma`` is the layer's input norm. Terms that depend on the query only
(the key bias ``bk``) cancel in the softmax over keys and are dropped. ``M_h = Wq_h^T Wk_g``
(D x D, rank <= d) is replaced by its best rank-``r`` approximation ``L_h R_h^T`` (truncated SVD,
computed through two thin QR factorisations, never forming M_h); ``gamma`` is folded into both
factors. Rotary embeddings are not applied: the selector scores content, not relative position
(the overlap table in ``docs/alvts.md`` measures what that costs).

Importance of token ``j`` at layer ``l``: the attention it receives from the item's own tokens
(every item token is a query, not causally masked: a causal mask makes early tokens win by
position alone; softmax over the item's tokens only), averaged over heads, normalised to sum 1.
Only the item's tokens are used, so the result does not depend on what else shares a prefill
step.
Consistency: ``s_l = (1 - w) * a_l + w * s_prev`` with ``s_prev`` the previous routed layer's
``s``. The ``num_process`` tokens of largest ``s_l`` go through the layer (ties: lowest index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QKFactors", "combine", "importance", "layer_factors", "top_tokens"]

#: Elements of one block of attention logits (heads x queries x keys) held at once.
_BLOCK_ELEMS = 1 << 24


@dataclass(frozen=True)
class QKFactors:
    """Low-rank query-key factors of one decoder layer (float32, on the weights' device).

    ``left``/``right``: (H, D, r); ``key_bias``: (H, D) or None (the key-side term the query
    bias contributes); ``scale``: 1/sqrt(head_dim); ``eps``: the input RMSNorm's epsilon.
    """

    left: Tensor
    right: Tensor
    key_bias: Tensor | None
    scale: float
    eps: float

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    @property
    def num_heads(self) -> int:
        return int(self.left.shape[0])


@torch.no_grad()
def layer_factors(
    q_weight: Tensor,
    k_weight: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    rank: int,
    q_bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
) -> QKFactors:
    """Factors of one layer from its weights (as ``nn.Linear`` stores them).

    ``q_weight`` (H*d, D), ``k_weight`` (G*d, D), ``q_bias`` (H*d,) or None, ``norm_weight``
    (D,) the input RMSNorm's gamma (None: no gamma). ``rank`` is capped at ``d``. The key bias is
    not needed (it only adds query-dependent constants). Computed in float64, stored float32.
    """
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    hd, dim = q_weight.shape
    if hd % num_heads:
        raise ValueError(f"q_weight rows ({hd}) are not a multiple of num_heads ({num_heads})")
    d = hd // num_heads
    if tuple(k_weight.shape) != (num_kv_heads * d, dim):
        raise ValueError(f"k_weight has shape {tuple(k_weight.shape)}, expected "
                         f"{(num_kv_heads * d, dim)}")
    r = min(rank, d, dim)
    wq = q_weight.detach().to(torch.float64)
    wk = k_weight.detach().to(torch.float64)
    if norm_weight is not None:
        g = norm_weight.detach().to(torch.float64)
        wq = wq * g
        wk = wk * g
    wq = wq.view(num_heads, d, dim)
    wk = wk.view(num_kv_heads, d, dim)
    group = num_heads // num_kv_heads
    q1, r1 = torch.linalg.qr(wq.transpose(1, 2))  # (H, D, d), (H, d, d)
    q2, r2 = torch.linalg.qr(wk.transpose(1, 2))  # (G, D, d), (G, d, d)
    q2 = q2.repeat_interleave(group, 0)
    r2 = r2.repeat_interleave(group, 0)
    u, s, vh = torch.linalg.svd(r1 @ r2.transpose(1, 2))  # M_h = q1 (r1 r2^T) q2^T
    root = s[:, :r].sqrt().unsqueeze(1)
    left = (q1 @ u[:, :, :r]) * root
    right = (q2 @ vh[:, :r, :].transpose(1, 2)) * root
    key_bias = None
    if q_bias is not None:
        bq = q_bias.detach().to(torch.float64).view(num_heads, d)
        key_bias = torch.einsum("hd,hdk->hk", bq, wk.repeat_interleave(group, 0))
    dev = q_weight.device
    return QKFactors(
        left=left.to(dev, torch.float32).contiguous(),
        right=right.to(dev, torch.float32).contiguous(),
        key_bias=None if key_bias is None else key_bias.to(dev, torch.float32).contiguous(),
        scale=float(d) ** -0.5,
        eps=float(eps),
    )


@torch.no_grad()
def importance(hidden: Tensor, factors: QKFactors, *, causal: bool = False,
               queries: Tensor | None = None) -> Tensor:
    """Approximate attention each of an item's N tokens receives.

    ``hidden`` (N, D): residual-stream states entering the layer (before its input norm), the
    keys. ``queries`` (M, D): the query tokens' states (default: the item's own tokens).
    ``causal`` (only without ``queries``): query ``i`` sees keys ``j <= i`` only. The softmax
    runs over the item's keys. Returns (N,) float32 summing to 1.
    """
    if hidden.dim() != 2 or hidden.shape[1] != factors.left.shape[1]:
        raise ValueError(f"hidden must be (N, {factors.left.shape[1]}), got {tuple(hidden.shape)}")
    n = int(hidden.shape[0])
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    x = _rms(hidden, factors.eps)
    xq = x if queries is None else _rms(queries, factors.eps)
    m = int(xq.shape[0])
    a = torch.einsum("nd,hdr->hnr", xq, factors.left)
    b = torch.einsum("nd,hdr->hnr", x, factors.right)
    kb = None if factors.key_bias is None else (factors.key_bias @ x.T)  # (H, N)
    mask = None
    if causal and queries is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    received = torch.zeros(n, dtype=torch.float32, device=x.device)
    step = max(1, _BLOCK_ELEMS // max(1, m * n))
    for h0 in range(0, factors.num_heads, step):
        h1 = min(factors.num_heads, h0 + step)
        logits = torch.bmm(a[h0:h1], b[h0:h1].transpose(1, 2)) * factors.scale
        if kb is not None:
            logits = logits + kb[h0:h1, None, :] * factors.scale
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        received += logits.softmax(-1).sum(dim=(0, 1))
    return received / received.sum()


def _rms(h: Tensor, eps: float) -> Tensor:
    x = h.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def combine(current: Tensor, previous: Tensor | None, consistency: float) -> Tensor:
    """Importance-consistency blend ``(1 - w) * current + w * previous`` (``previous`` None:
    ``current``)."""
    if previous is None or consistency == 0.0:
        return current
    return (1.0 - consistency) * current + consistency * previous


def top_tokens(score: Tensor, num_process: int) -> Tensor:
    """Ascending int64 indices of the ``num_process`` largest scores (ties: lowest index)."""
    n = int(score.shape[0])
    if not 0 <= num_process <= n:
        raise ValueError(f"num_process must be in [0, {n}], got {num_process}")
    if num_process == n:
        return torch.arange(n, dtype=torch.int64, device=score.device)
    order = torch.sort(-score.to(torch.float32), stable=True).indices[:num_process]
    return order.sort().values.to(torch.int64)
