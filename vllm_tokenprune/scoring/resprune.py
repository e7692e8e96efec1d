"""ResPrune: text-conditioned greedy subspace expansion guided by residual energy (pure torch,
no vLLM).

Reading of the paper (``shared/notes/methods.md``): pick tokens one by one, each time the
token with the largest *relevance-weighted* residual energy with respect to the span of the
tokens picked so far, then deflate. Without text (or with ``relevance_weight = 0``) this is
greedy column-subset selection, the pivot order of column-pivoted QR of ``X^T``; it greedily
minimises the error of reconstructing all tokens from the span of the kept ones.

Relevance (choices are ours, all options in :class:`ResPruneOptions`):

* ``c_i`` = cosine similarity of token i to the prompt's text embeddings (same LM embedding
  space), pooled over text tokens by ``text_pool`` (default ``max``: a patch only needs to match
  one word of the instruction).
* ``rel_i = exp((c_i - max_j c_j) / temperature)`` in (0, 1] (a softmax rescaled so the most
  relevant token has weight 1), and the selection weight is
  ``w_i = (1 - relevance_weight) + relevance_weight * rel_i``. With the default
  ``relevance_weight = 0.5`` a fully relevant token counts its residual energy up to twice as much
  as an irrelevant one; ``relevance_weight = 0`` (or no text) is the pure residual greedy.
* ``sketch_dim``: the greedy runs on a seeded Gaussian random projection of the hidden dimension
  (default 256; 0 = exact). Relevance always uses the exact, unsketched features. When more tokens
  than the sketch width are kept, the greedy restarts a new round once the sketched space is
  spanned (see :mod:`._greedy`).
* ``normalize_rows`` (default off): greedy on unit-norm tokens, i.e. on directions only; off keeps
  the reconstruction objective, where high-energy tokens matter more.

Text-conditioned: the kept set depends on the prompt, so any cache of encoder outputs keyed by the
image alone must be placed before this scorer runs (or also key on the prompt).

Batched: all items advance through one greedy loop (``padded-greedy``); per step one batched
mat-vec, no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, prefix_sorted, text_relevance, unit_rows
from vllm_tokenprune.scoring._greedy import residual_greedy, sketch
from vllm_tokenprune.scoring._registry import option, register_method

__all__ = ["ResPruneOptions", "resprune_weights"]


@dataclass(frozen=True)
class ResPruneOptions:
    """Options of ``resprune``."""

    relevance_weight: float = option(
        0.5,
        "lambda in [0, 1]: mix of text relevance into the selection weight "
        "(0 = text-free residual greedy, 1 = weight is the relevance alone).",
        ge=0.0,
        le=1.0,
    )
    temperature: float = option(
        0.1, "Softmax temperature on the cosine similarities to the text.", gt=0.0
    )
    text_pool: Literal["max", "mean"] = option(
        "max", "Pool the per-text-token cosine similarities by max or mean."
    )
    sketch_dim: int = option(
        256, "Random-projection width of the hidden dimension for the greedy (0 = off).", ge=0
    )
    normalize_rows: bool = option(False, "Run the greedy on unit-norm tokens (directions only).")
    seed: int = option(0, "Seed of the random projection.", ge=0)


def resprune_weights(batch: Batch, x: Tensor, opts: ResPruneOptions) -> Tensor | None:
    """Selection weights ``(B, N_max)`` from the text relevance, or None without any text."""
    if opts.relevance_weight == 0.0 or all(t is None for t in batch.text_embeds):
        return None
    lam = opts.relevance_weight
    weights = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    for i, text in enumerate(batch.text_embeds):
        if text is None:
            continue
        n = batch.sizes[i]
        c = text_relevance(unit_rows(x[i, :n]), text, opts.text_pool)
        rel = torch.exp((c - c.amax()) / opts.temperature)
        weights[i, :n] = (1.0 - lam) + lam * rel
    return weights


@register_method(
    "resprune",
    options=ResPruneOptions,
    summary="text-weighted greedy residual-energy subspace expansion",
    batched_kind="padded-greedy",
    uses_text=True,
)
def resprune(batch: Batch, opts: ResPruneOptions) -> list[Tensor]:
    x, mask = batch.padded()
    weights = resprune_weights(batch, x, opts)
    xs = sketch(x, opts.sketch_dim, opts.seed)
    if opts.normalize_rows:
        xs = unit_rows(xs)
    order = residual_greedy(xs, weights, mask, max(batch.num_keep))
    return prefix_sorted(order, batch.num_keep)
