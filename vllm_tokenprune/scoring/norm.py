"""norm baseline: keep the tokens with the largest L2 norm (pure torch, no vLLM).

Row norms are computed in float32 straight from the input dtype (no float32 copy of the tokens),
one reduction per item; the per-item score vectors are padded to ``(B, N_max)`` and selected in
one masked sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_tokenprune.scoring._common import Batch, select_top
from vllm_tokenprune.scoring._registry import register_method

__all__ = ["NormOptions"]


@dataclass(frozen=True)
class NormOptions:
    """``norm`` has no options."""


def _norm32(x: Tensor) -> Tensor:
    if x.dtype == torch.float64:  # math in float32 whatever the input dtype
        x = x.float()
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def _row_norms(batch: Batch) -> Tensor:
    # per item (no stacked copy of the inputs); the scores are padded to (B, N_max)
    sizes = batch.sizes
    out = torch.zeros(batch.size, max(sizes), dtype=torch.float32, device=batch.device)
    for i, f in enumerate(batch.features):
        out[i, : sizes[i]] = _norm32(f)
    return out


@register_method("norm", options=NormOptions, summary="largest L2 norm")
def norm(batch: Batch, opts: NormOptions) -> list[Tensor]:
    return select_top(_row_norms(batch), batch.mask(), batch.num_keep)
