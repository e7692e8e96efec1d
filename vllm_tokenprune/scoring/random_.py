"""random baseline: a seeded uniformly random subset (pure torch, no vLLM).

Each token gets a pseudo-random 32-bit key that is a pure integer hash of ``(seed, index)``
(:func:`._common.hash_keys`); the k tokens with the smallest keys are kept. No generator state is
involved, so the subset is identical on every device, for every batch composition, and nested:
the subset kept at budget k is contained in the one kept at budget k + 1. Items of different N
share the same key sequence (padded, masked) and one batched sort.
The module is called ``random_`` so that it does not shadow the standard library ``random``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, hash_keys, select_top
from vllm_tokenprune.scoring._registry import option, register_method

__all__ = ["RandomOptions"]


@dataclass(frozen=True)
class RandomOptions:
    """Options of ``random``."""

    seed: int = option(0, "Seed of the subset (same seed, same N -> same subset).", ge=0)


@register_method("random", options=RandomOptions, summary="seeded uniformly random subset")
def random(batch: Batch, opts: RandomOptions) -> list[Tensor]:
    n_max = max(batch.sizes)
    keys = hash_keys(n_max, opts.seed, batch.device).expand(batch.size, n_max)
    return select_top(-keys, batch.mask(), batch.num_keep)
