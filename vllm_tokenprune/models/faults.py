"""Test-only fault injection and accounting hooks of the worker (runs in the worker).

Inert unless their environment variable is set when the worker starts (nothing here runs on a
user's server):

* ``VLLM_TOKENPRUNE_TEST_ENCODER_LOG=<file>`` appends one line per vision-tower call
  (``call <unpruned tokens> <cap>``), per encoder batch (``batch <unpruned tokens> <cap>``) and
  per staging of a sub-batch's pixels to the device (``stage <bytes> <profiled batch's pixel
  bytes, 0 until the profile run came by>``) (:func:`log_encoder_call`) and, measured on the
  tower module itself (a forward pre-hook, :func:`watch_tower`), one line per input the tower
  receives (``tower <tokens in its input> <cap>``);
* ``VLLM_TOKENPRUNE_TEST_NAN_TOKENS=<N>`` makes the scorer see NaN features for every item of
  exactly N tokens (:func:`poison_for_test`);
* ``VLLM_TOKENPRUNE_TEST_FAULTS=<site>:<N>[,...]`` makes one failure site of the worker fail for
  items of N rows (``*``: every item), see :data:`FAULT_SITES` (:func:`fault_for_test`,
  :func:`shorten_for_test`). Each site exercises one fallback of
  :mod:`vllm_tokenprune.models.fallbacks`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

ENCODER_LOG_ENV = "VLLM_TOKENPRUNE_TEST_ENCODER_LOG"
NAN_TOKENS_ENV = "VLLM_TOKENPRUNE_TEST_NAN_TOKENS"
FAULTS_ENV = "VLLM_TOKENPRUNE_TEST_FAULTS"

#: Test-only failure sites (``VLLM_TOKENPRUNE_TEST_FAULTS``), each keyed on a row count N:
#: the params row of an item keeping N rows names an unknown method (``params``); the encoder
#: gives an item keeping N rows one row fewer than its grid (``count_mismatch``); the M-RoPE
#: position fill fails for a request whose step carries N media rows (``positions``); the
#: runner skips ``recompute_mrope_positions`` for such a request (``no_recompute``); reading
#: the routed items of a step fails when an ``alvts`` item has N rows (``alvts_take``).
FAULT_PARAMS = "params"
FAULT_COUNT_MISMATCH = "count_mismatch"
FAULT_POSITIONS = "positions"
FAULT_NO_RECOMPUTE = "no_recompute"
FAULT_ALVTS_TAKE = "alvts_take"
FAULT_SITES = (FAULT_PARAMS, FAULT_COUNT_MISMATCH, FAULT_POSITIONS, FAULT_NO_RECOMPUTE,
               FAULT_ALVTS_TAKE)


def parse_faults(value: str | None) -> dict[str, int | None]:
    """``"site:N,site:*"`` -> {site: N or None (every item)}; ValueError on an unknown site."""
    out: dict[str, int | None] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        site, _, count = part.strip().partition(":")
        if site not in FAULT_SITES:
            raise ValueError(f"{FAULTS_ENV}: unknown site {site!r}; sites: {FAULT_SITES}")
        out[site] = None if count in ("", "*") else int(count)
    return out


_ENCODER_LOG = os.environ.get(ENCODER_LOG_ENV) or None
_NAN_TOKENS = int(os.environ[NAN_TOKENS_ENV]) if os.environ.get(NAN_TOKENS_ENV) else None
_FAULTS = parse_faults(os.environ.get(FAULTS_ENV))
_lock = threading.Lock()


def log_encoder_call(kind: str, tokens: int, cap: int | None) -> None:
    """Test-only: record one vision-tower call or encoder batch (inert unless the env is set)."""
    if _ENCODER_LOG is None:
        return
    with _lock, open(_ENCODER_LOG, "a") as f:
        f.write(f"{kind} {tokens} {cap if cap else 0}\n")


def watch_tower(model: Any, cap: int | None) -> None:
    """Test-only: log ``tower <tokens> <cap>`` for every input the model's vision tower
    receives (inert unless ``VLLM_TOKENPRUNE_TEST_ENCODER_LOG`` is set). The tokens are the
    patch rows of its first argument over the merge unit (Qwen-VL towers: ``(patches, C)``
    pixel rows, ``spatial_merge_size ** 2`` patches a token); other towers are not watched."""
    tower = getattr(model, "visual", None)
    merge = getattr(tower, "spatial_merge_size", None)
    if _ENCODER_LOG is None or tower is None or not isinstance(merge, int):
        return

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            log_encoder_call("tower", int(args[0].shape[0]) // (merge * merge), cap)

    tower.register_forward_pre_hook(hook)


def poison_for_test(feats: Sequence[torch.Tensor], num_tokens: Sequence[int]
                    ) -> list[torch.Tensor]:
    """Test-only: NaN features for items of ``VLLM_TOKENPRUNE_TEST_NAN_TOKENS`` tokens."""
    if _NAN_TOKENS is None:
        return list(feats)
    return [f * float("nan") if n == _NAN_TOKENS else f
            for f, n in zip(feats, num_tokens, strict=True)]


def fault_for_test(site: str, rows: int, *, raise_: bool = False) -> bool:
    """Test-only: whether ``site`` fails for an item of ``rows`` rows
    (``VLLM_TOKENPRUNE_TEST_FAULTS``); ``raise_``: raise instead of returning True."""
    if site not in _FAULTS:
        return False
    count = _FAULTS[site]
    if count is not None and count != rows:
        return False
    if raise_:
        raise RuntimeError(f"test fault at {site} ({FAULTS_ENV})")
    return True


def shorten_for_test(embeds: Sequence[torch.Tensor], params: torch.Tensor | None
                     ) -> Sequence[torch.Tensor]:
    """Test-only: one row fewer for items whose params row keeps the ``count_mismatch``
    fault's N rows (an encoder/processor count mismatch)."""
    if FAULT_COUNT_MISMATCH not in _FAULTS or not isinstance(params, torch.Tensor):
        return embeds
    keeps = [int(r[0]) for r in params.reshape(len(embeds), -1).tolist()]
    return [e[:-1] if fault_for_test(FAULT_COUNT_MISMATCH, k) else e
            for e, k in zip(embeds, keeps, strict=True)]
