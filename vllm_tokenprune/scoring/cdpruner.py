"""CDPruner: conditional DPP over the tokens, greedy MAP inference (pure torch, no vLLM).

Kernel (our reading; options in :class:`CDPrunerOptions`): ``L = diag(q) S diag(q)`` with
``S_ij = cos(x_i, x_j)`` and per-token quality ``q_i = exp(alpha * r_i)``, where ``r_i`` is the
min-max normalised (to [0, 1]) cosine relevance of token i to the prompt's text embeddings
(pooled over text tokens by ``text_pool``) and ``alpha = theta / (2 (1 - theta))``. With this
parametrisation ``log det L_Y = theta/(1-theta) * sum_{i in Y} r_i + log det S_Y`` up to the
factor ``1/(1-theta)``, i.e. the MAP objective is ``theta * relevance + (1 - theta) * diversity``;
``theta = 0`` (or no text: uniform q) is a plain DPP on cosine similarity.

Inference: the fast greedy MAP of Chen et al. (2018) -- add the token with the largest marginal
gain ``d_i^2`` of ``log det``, update every ``d_i^2`` by the new incremental-Cholesky row. As the
kernel has the explicit low-rank factor ``diag(q) X_unit``, the Cholesky row is computed as a
mat-vec against one new orthonormal direction (:mod:`._greedy`): no ``N x N`` kernel is formed and
memory is ``O(k D)``. When the kernel's rank is exhausted (more picks than its numerical rank) the
greedy restarts on the remaining tokens. ``sketch_dim`` (default 0 = exact) optionally runs the
greedy on a random projection of the unit-norm tokens.

Batched: all items advance through one greedy loop (``padded-greedy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, prefix_sorted, text_relevance
from vllm_tokenprune.scoring._greedy import residual_greedy, sketch
from vllm_tokenprune.scoring._registry import option, register_method

__all__ = ["CDPrunerOptions", "cdpruner_quality"]


@dataclass(frozen=True)
class CDPrunerOptions:
    """Options of ``cdpruner``."""

    theta: float = option(
        0.5,
        "Relevance/diversity trade-off in [0, 1): q_i = exp(theta / (2 (1 - theta)) * r_i) "
        "(0 = pure diversity).",
        ge=0.0,
        lt=1.0,
    )
    text_pool: Literal["max", "mean"] = option(
        "mean", "Pool the per-text-token cosine similarities by mean or max."
    )
    sketch_dim: int = option(
        0, "Random-projection width of the hidden dimension for the greedy (0 = exact).", ge=0
    )
    seed: int = option(0, "Seed of the random projection.", ge=0)


def cdpruner_quality(batch: Batch, x_unit: Tensor, opts: CDPrunerOptions) -> Tensor | None:
    """Per-token DPP quality ``q`` ``(B, N_max)``, or None (uniform) without text."""
    if opts.theta == 0.0 or all(t is None for t in batch.text_embeds):
        return None
    alpha = opts.theta / (2.0 * (1.0 - opts.theta))
    quality = torch.ones(x_unit.shape[:2], dtype=torch.float32, device=x_unit.device)
    for i, text in enumerate(batch.text_embeds):
        if text is None:
            continue
        n = batch.sizes[i]
        c = text_relevance(x_unit[i, :n], text, opts.text_pool)
        lo, hi = c.amin(), c.amax()
        r = (c - lo) / (hi - lo).clamp_min(1e-12)
        quality[i, :n] = torch.exp(alpha * r)
    return quality


@register_method(
    "cdpruner",
    options=CDPrunerOptions,
    summary="conditional DPP (relevance x cosine-similarity kernel), greedy MAP",
    batched_kind="padded-greedy",
    uses_text=True,
)
def cdpruner(batch: Batch, opts: CDPrunerOptions) -> list[Tensor]:
    x, mask = batch.padded()
    x_unit = x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-30))  # in place: x is our copy
    quality = cdpruner_quality(batch, x_unit, opts)
    xs = sketch(x_unit, opts.sketch_dim, opts.seed)
    weights = None if quality is None else quality.square()
    order = residual_greedy(xs, weights, mask, max(batch.num_keep))
    return prefix_sorted(order, batch.num_keep)
