"""Patch tokens from the photographs bundled with scikit-image (real data nobody here wrote).

Used by the scorer tests and ``benchmarks/fidelity.py``: a photo cut into square patches,
CLIP-normalised, and a fixed seeded random projection to ``dim`` features per patch.
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = np.array([0.4815, 0.4578, 0.4082])
CLIP_STD = np.array([0.2686, 0.2613, 0.2758])


def patch_tokens(name: str, patch: int = 14, dim: int = 256,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(N, dim) float32 tokens, per-patch grey-level variance (N,), and the (h, w) patch grid."""
    import skimage.data as skdata

    img = np.asarray(getattr(skdata, name)(), dtype=np.float64) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    h, w = img.shape[0] // patch, img.shape[1] // patch
    img = img[: h * patch, : w * patch]
    patches = img.reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(h * w, patch * patch, 3)
    variance = torch.from_numpy(patches.mean(-1).var(axis=1))
    flat = torch.from_numpy(((patches - CLIP_MEAN) / CLIP_STD).reshape(h * w, -1))
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(flat.shape[1], dim, generator=g, dtype=torch.float64) / dim**0.5
    return (flat @ proj).float(), variance, (h, w)
