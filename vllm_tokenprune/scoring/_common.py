"""Shared plumbing for the scorers: input validation, float32 padding, deterministic selection
(pure torch, no vLLM).

Conventions every scorer follows:

* All math runs in float32 (bf16/fp16/fp64 inputs are copied into a fresh float32 buffer).
* Items of different token counts are stacked into one ``(B, N_max, D)`` buffer, padded rows are
  zero and a boolean mask marks the valid rows; padded rows never influence valid rows' scores.
* The final choice is "k largest scores, ties broken by lowest index": a *stable* descending sort
  (never ``torch.topk``, whose tie order is unspecified), then the kept indices sorted ascending.
* Randomness never comes from the global RNG. Gaussian matrices come from a ``torch.Generator``
  seeded with the ``seed`` option, created on the CPU (so CPU and GPU get the same numbers) and
  cached per device; per-token pseudo-random keys come from an integer hash of ``(seed, index)``
  that runs on any device with no generator at all.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Batch",
    "gaussian_matrix",
    "hash_keys",
    "select_top",
    "text_relevance",
]


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got bool {value!r}")
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        kind = type(value).__name__
        raise ValueError(f"{what} must be an integer, got {kind} {value!r}") from None


def check_features(features: object, what: str = "features") -> Tensor:
    """Shape/dtype checks that need no device synchronisation."""
    if not isinstance(features, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(
            f"{what} must be 2-D (num_tokens, hidden_dim), got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"{what} must have a floating dtype, got {features.dtype}")
    n, d = features.shape
    if n < 1 or d < 1:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(features.shape)}")
    return features


def check_num_keep(num_keep: object, num_tokens: int) -> int:
    k = _as_int(num_keep, "num_keep")
    if k <= 0:
        raise ValueError(f"num_keep must be >= 1, got {k}")
    if k > num_tokens:
        raise ValueError(f"num_keep={k} exceeds the number of tokens N={num_tokens}")
    return k


def check_grid(grid: object, num_tokens: int) -> tuple[int, int, int] | None:
    if grid is None:
        return None
    try:
        parts = tuple(grid)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"grid must be a (t, h, w) tuple, got {grid!r}") from None
    if len(parts) != 3:
        raise ValueError(f"grid must be a (t, h, w) tuple of 3 ints, got {grid!r}")
    t, h, w = (_as_int(p, "grid entry") for p in parts)
    if min(t, h, w) < 1:
        raise ValueError(f"grid entries must be >= 1, got {(t, h, w)}")
    if t * h * w != num_tokens:
        raise ValueError(
            f"grid {(t, h, w)} has t*h*w={t * h * w} cells but features have N={num_tokens} tokens"
        )
    return (t, h, w)


def check_text(text: object, dim: int, device: torch.device) -> Tensor | None:
    if text is None:
        return None
    if not isinstance(text, Tensor):
        raise ValueError(f"text_embeds must be a torch.Tensor or None, got {type(text).__name__}")
    if text.dim() == 1:
        text = text.unsqueeze(0)
    if text.dim() != 2 or not text.is_floating_point():
        raise ValueError(
            f"text_embeds must be a 2-D float tensor (M, D), got shape {tuple(text.shape)} "
            f"dtype {text.dtype}"
        )
    if text.shape[1] != dim:
        raise ValueError(
            f"text_embeds width {text.shape[1]} does not match the features' width D={dim}"
        )
    if text.shape[0] == 0:
        return None
    if text.device != device:
        raise ValueError(f"text_embeds is on {text.device} but features are on {device}")
    return text


def check_finite(tensors: Sequence[Tensor], what: str,
                 *more: tuple[Sequence[Tensor], str]) -> None:
    """One host sync for the whole batch (needed to raise a Python exception): ``tensors``
    (named ``what``) and every further ``(tensors, what)`` group checked together."""
    named = [(t, w, i) for ts, w in ((tensors, what), *more) for i, t in enumerate(ts)]
    if not named:
        return
    # min/max propagate NaN and expose +-Inf: a single fast reduction per tensor (several times
    # cheaper than isfinite().all(), which materialises a bool tensor)
    flags = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all()
                         for t, _, _ in named])
    if not bool(flags.all()):
        _, w, i = named[int((~flags).nonzero()[0, 0])]
        raise ValueError(f"{w}[{i}] contains NaN or Inf values")


@dataclass
class Batch:
    """Validated inputs of one scorer call (a bucket of media items).

    ``features`` keep their original dtype; :meth:`padded` makes the float32 working copy.
    """

    features: list[Tensor]
    num_keep: list[int]
    text_embeds: list[Tensor | None]
    grids: list[tuple[int, int, int] | None]

    @property
    def size(self) -> int:
        return len(self.features)

    @property
    def sizes(self) -> list[int]:
        return [int(f.shape[0]) for f in self.features]

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    def subset(self, idx: Sequence[int]) -> Batch:
        return Batch(
            [self.features[i] for i in idx],
            [self.num_keep[i] for i in idx],
            [self.text_embeds[i] for i in idx],
            [self.grids[i] for i in idx],
        )

    def padded(self) -> tuple[Tensor, Tensor]:
        """Fresh float32 ``(B, N_max, D)`` buffer (zero padding) and ``(B, N_max)`` bool mask."""
        sizes = self.sizes
        n_max = max(sizes)
        x = torch.zeros(self.size, n_max, self.dim, dtype=torch.float32, device=self.device)
        for i, f in enumerate(self.features):
            x[i, : sizes[i]].copy_(f)
        return x, self.mask()

    def mask(self) -> Tensor:
        return prefix_mask(self.sizes, max(self.sizes), self.device)

    def counts(self) -> Tensor:
        """Valid-token counts as a float32 ``(B, 1)`` device tensor."""
        return small_tensor(self.sizes, torch.float32, self.device)[:, None]


def small_tensor(values: Sequence[int | float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A short host list as a device tensor without a blocking copy (pinned + non_blocking on
    CUDA, where a pageable host-to-device copy would synchronise the stream)."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def prefix_mask(counts: Sequence[int], length: int, device: torch.device) -> Tensor:
    """``(B, length)`` bool mask, row b true on its first ``counts[b]`` entries."""
    n = small_tensor(counts, torch.int64, device)
    return torch.arange(length, device=device) < n[:, None]


def select_top(scores: Tensor, mask: Tensor, num_keep: Sequence[int]) -> list[Tensor]:
    """Per row, the ``num_keep[b]`` highest scores among valid entries, ascending int64 indices.

    Ties go to the lowest index (stable descending sort). Padded entries are never chosen.
    """
    if scores.is_floating_point():
        scores = scores.float().masked_fill(~mask, float("-inf"))
    else:
        scores = scores.masked_fill(~mask, torch.iinfo(scores.dtype).min)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return prefix_sorted(order, num_keep)


def prefix_sorted(order: Tensor, num_keep: Sequence[int]) -> list[Tensor]:
    """Take the first ``num_keep[b]`` entries of each row of ``order`` and sort them ascending."""
    k_max = max(num_keep)
    head = order[:, :k_max]
    beyond = ~prefix_mask(num_keep, k_max, order.device)
    head = head.masked_fill(beyond, torch.iinfo(torch.int64).max)
    head = torch.sort(head, dim=-1).values
    return [head[b, :k].clone() for b, k in enumerate(num_keep)]


@functools.lru_cache(maxsize=64)
def _gaussian_cached(rows: int, cols: int, seed: int, device: str) -> Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    mat = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    return mat.to(device)


def gaussian_matrix(rows: int, cols: int, seed: int, device: torch.device) -> Tensor:
    """Seeded standard-normal ``(rows, cols)`` float32 matrix, identical on every device. Cached:
    do not modify the returned tensor in place."""
    return _gaussian_cached(rows, cols, seed, str(device))


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor | int) -> Tensor | int:
    # A 32-bit avalanche hash (xor-shift / multiply rounds). Values stay below 2**32 and the
    # multipliers below 2**31, so int64 products never overflow: identical on every device.
    # Works on Python ints (host) and int64 tensors alike.
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x46B8A18B) & _M32
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 15)


def hash_keys(n: int, seed: int, device: torch.device) -> Tensor:
    """Pseudo-random int64 keys in [0, 2**32) for token indices ``0..n-1``: a pure function of
    ``(seed, index)``, independent of the device and of the other items in a batch."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    s = int(_mix32((seed & _M32) + 0x3C6EF372))  # host int: no host-to-device copy
    return _mix32(_mix32(idx ^ s) + ((seed >> 32) & _M32) + 0x9E3779B9)


def text_relevance(x_unit: Tensor, text: Tensor, pool: str) -> Tensor:
    """Cosine similarity of each token (rows of ``x_unit``, already unit-norm) to the prompt's
    text embeddings ``(M, D)``, pooled over the text tokens with ``max`` or ``mean``: ``(N,)``."""
    t = text.float()
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = x_unit @ t.T
    return sims.amax(dim=-1) if pool == "max" else sims.mean(dim=-1)


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def buckets(sizes: Sequence[int], max_waste: float = 0.25) -> list[list[int]]:
    """Group item indices so that padding to each group's largest N wastes at most ``max_waste``
    of the group's padded buffer (items sorted by size; equal sizes always share a group)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in reversed(order):  # largest first: the first member fixes the group's N_max
        n = sizes[i]
        if cur:
            n_max = sizes[cur[0]]
            if (total + n) < (1.0 - max_waste) * n_max * (len(cur) + 1):
                groups.append(cur)
                cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def isqrt_round(x: float) -> int:
    return int(math.floor(math.sqrt(x) + 0.5))
