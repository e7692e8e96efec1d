"""The per-item wire format between the processor side and the model side (shared: imported by
the API server and the worker).

The processor (API server) carries one row of ints per media item to the model (worker) as a
batched multimodal field (``<modality>_prune_params``, kept on CPU so reading it never syncs a
device): ``[num_keep, method_id, num_tokens, t, h, w, *extra]`` (see :data:`PARAMS_HEAD`), where
``num_tokens`` is how many tokens the scorer chooses from, ``(t, h, w)`` their grid (``t = 0``:
no grid) and ``extra`` whatever else the architecture's model side needs (LLaVA-NeXT: where its
image-newline tokens sit). Text-conditioned methods also get ``<modality>_prune_text_ids``;
vLLM's profiling dummy items carry ``<modality>_prune_profile``. The pixel fields
(:data:`STAGED_FIELDS`) are declared ``keep_on_cpu`` too, so the model moves them to the device
one encoder sub-batch at a time.

For M-RoPE models the kept embedding rows carry their unpruned ``(t, h, w)`` positions as
:data:`POS_CHANNELS` extra channels (base-256 digit pairs, so they survive bf16 exactly at any
grid size) until ``recompute_mrope_positions`` strips them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from vllm_tokenprune.scoring import INPUT, get_method, list_methods


class _MethodIds(Mapping[str, int]):
    """Live view ``{method name: wire id}`` over the registry (every stage)."""

    def __getitem__(self, name: str) -> int:
        try:
            return get_method(name).wire_id
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(list_methods(None))

    def __len__(self) -> int:
        return len(list_methods(None))


class _MethodsById(Mapping[int, str]):
    """Live view ``{wire id: method name}`` over the registry (every stage)."""

    def __getitem__(self, ident: int) -> str:
        for name in list_methods(None):
            if get_method(name).wire_id == ident:
                return name
        raise KeyError(ident)

    def __iter__(self) -> Iterator[int]:
        return iter(get_method(name).wire_id for name in list_methods(None))

    def __len__(self) -> int:
        return len(list_methods(None))


#: Method <-> integer id of the per-item tensor field: each method's registry id
#: (:func:`vllm_tokenprune.scoring.wire_id`, a hash of its name), the same in every process and
#: node whatever else is installed. For a layer-stage method ``num_keep`` is the count of the
#: item's tokens that go through each routed layer; the input keeps all ``num_tokens``.
METHOD_IDS: Mapping[str, int] = _MethodIds()
METHODS_BY_ID: Mapping[int, str] = _MethodsById()

#: Longest scorer text (in tokens, the last ones of the item's message) carried per item in
#: ``<modality>_prune_text_ids`` (the row's width; -1 pads).
MAX_TEXT_TOKENS = 256

#: Leading columns of a per-item params row: num_keep, method_id, num_tokens, t, h, w.
PARAMS_HEAD = 6
#: Channels appended to each kept embedding row: its (t, h, w) position as base-256 digits.
POS_CHANNELS = 6
#: Channels appended (before any position channels) to every row of an item routed layer by
#: layer (``alvts``): ``[role, index, k, N]``, role 1 = scored visual token, 2 = always goes
#: through (LLaVA-NeXT's image-newline rows), plus 2 for a video's rows; index, k, N as
#: base-256 digit pairs.
ROUTE_CHANNELS = 7

Grid = tuple[int, int, int]


def params_key(modality: str) -> str:
    return f"{modality}_prune_params"


def text_key(modality: str) -> str:
    return f"{modality}_prune_text_ids"


def profile_key(modality: str) -> str:
    """The field that marks vLLM's profiling dummy items (present on them only)."""
    return f"{modality}_prune_profile"


#: The pixel fields the processor declares ``keep_on_cpu``: the runners leave them on the host
#: and the model stages them to the device one encoder sub-batch at a time
#: (:func:`vllm_tokenprune.models.staging.stage_items`).
STAGED_FIELDS = ("pixel_values", "pixel_values_videos")


class ItemLayout(NamedTuple):
    """What the processor knows about one media item before its encoder runs.

    ``num_tokens``: tokens the scorer chooses from; ``grid``: their (t, h, w) layout, or None;
    ``extra``: architecture-specific ints for the model side.
    """

    num_tokens: int
    grid: Grid | None = None
    extra: tuple[int, ...] = ()

    def row(self, num_keep: int, method_id: int) -> list[int]:
        t, h, w = self.grid or (0, 0, 0)
        return [num_keep, method_id, self.num_tokens, t, h, w, *self.extra]


class ItemParams(NamedTuple):
    """A params row as the model side reads it (``stage``: the method's, from the registry)."""

    num_keep: int
    method: str
    num_tokens: int
    grid: Grid | None
    extra: tuple[int, ...]
    stage: str = INPUT

    @classmethod
    def from_row(cls, row: Sequence[int]) -> ItemParams:
        """Parse and validate a row; ValueError naming what is wrong (the worker serves such an
        item by the fallback, never raises: ``TokenPruneModelMixin._tp_params``)."""
        if len(row) < PARAMS_HEAD:
            raise ValueError(f"a params row has {len(row)} values, expected at least "
                             f"{PARAMS_HEAD}")
        num_keep, method_id, num_tokens, t, h, w = (int(v) for v in row[:PARAMS_HEAD])
        method = METHODS_BY_ID.get(method_id)
        if method is None:
            raise ValueError(f"unknown method id {method_id}")
        if num_tokens < 1 or not 0 <= num_keep <= num_tokens:
            raise ValueError(f"num_keep {num_keep} / num_tokens {num_tokens} out of range")
        if t < 0 or (t > 0 and (h < 1 or w < 1 or t * h * w != num_tokens)):
            raise ValueError(f"grid {(t, h, w)} does not hold {num_tokens} tokens")
        return cls(num_keep, method, num_tokens, (t, h, w) if t > 0 else None,
                   tuple(int(v) for v in row[PARAMS_HEAD:]), get_method(method).stage)


#: Relative positions at or above this do not fit :func:`encode_positions`' two digits.
MAX_POSITION = 256 * 256


def encode_positions(pos: torch.Tensor, dtype: torch.dtype, *, check: bool = True
                     ) -> torch.Tensor:
    """(n, 3) int64 -> (n, 6) ``dtype``: each value as (value // 256, value % 256).

    Every digit is an integer in [0, 256), exact in bf16/fp16/fp32 alike. ``check`` (a host
    read of the maximum: a device sync for device positions) refuses values that do not fit;
    callers that checked before moving positions to the device pass False.
    """
    if check and pos.numel() and int(pos.max()) >= MAX_POSITION:
        raise ValueError("media grid too large for position encoding (>= 65536)")
    return torch.cat([pos // 256, pos % 256], dim=1).to(dtype)


def encode_route(roles: torch.Tensor, num_process: int, dtype: torch.dtype,
                 video: bool = False) -> torch.Tensor:
    """(n,) int roles (1: scored, 2: always through) -> (n, ROUTE_CHANNELS) ``dtype`` rows
    ``[role, index, k, N]`` (index counts scored rows only; digits exact in bf16; a video's
    roles are written plus 2, :func:`route_is_video`)."""
    roles = roles.to(torch.int64)
    scored = roles == 1
    index = torch.cumsum(scored.to(torch.int64), 0) - 1
    index = torch.where(scored, index, torch.zeros_like(index))
    n = int(scored.sum())
    if n >= 256 * 256:
        raise ValueError("media item too large for layer-wise routing (>= 65536 tokens)")
    cols = [roles + 2 if video else roles, index // 256, index % 256]
    for v in (num_process, n):
        cols += [torch.full_like(roles, v // 256), torch.full_like(roles, v % 256)]
    return torch.stack(cols, dim=1).to(dtype)


def decode_route(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(n, ROUTE_CHANNELS) -> (roles (n,), index (n,), k, N), inverse of :func:`encode_route`
    (int64, on the channels' device; k and N from the first row)."""
    d = channels.round().long()
    index = d[:, 1] * 256 + d[:, 2]
    k = int(d[0, 3]) * 256 + int(d[0, 4]) if d.shape[0] else 0
    n = int(d[0, 5]) * 256 + int(d[0, 6]) if d.shape[0] else 0
    return (d[:, 0] - 1) % 2 + 1, index, k, n


def route_is_video(channels: torch.Tensor) -> bool:
    """Whether the rows of :func:`encode_route` are a video's."""
    return bool(channels.shape[0]) and int(channels[0, 0].round()) > 2


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(n, 6) float -> (3, n) int64, inverse of :func:`encode_positions`."""
    digits = channels.round().long()
    return (digits[:, :3] * 256 + digits[:, 3:]).permute(1, 0)

