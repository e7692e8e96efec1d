"""The bridge's seal on the pruning fields it validated, and the guard on vLLM's trust check
(runs in the API server).

Per-request ``mm_processor_kwargs`` are refused by vLLM unless the server trusts clients
(``--trust-request-mm-kwargs``), because arbitrary HF-processor options change preprocessing
cost. The bridge never switches that check off. It seals the kwargs it writes with an HMAC
under a per-process random key (:data:`SEAL_KEY`, never sent to clients), and
:func:`install_request_guard` wraps vLLM's check so that exactly the sealed pruning keys, with
exactly the values the bridge validated, are exempt; everything else in ``mm_processor_kwargs``
still goes through vLLM's own rule. Pruning keys in ``mm_processor_kwargs`` without a valid seal
(a bypassed or missing bridge) are refused with a 400, and the model's processor validates the
values again, so no path serves a request with a value the bridge would have refused.

vLLM internals touched (also in :data:`vllm_tokenprune._vllm_internals.INTERNALS`):
``vllm.renderers.online_renderer.validate_request_mm_kwargs`` (module global, rebound to a
wrapper) and, when that module is importable, the same name in
``vllm.entrypoints.pooling.base.serving``: the only places vLLM applies
``--trust-request-mm-kwargs`` to online requests. If the name is missing (vLLM moved it), the
server refuses to start rather than serve without the guard. ``VLLMValidationError``
(``vllm.exceptions``): raised by the wrapper so vLLM answers 400 with ``param`` set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Any

from vllm_tokenprune.config import SEALED_FIELDS

#: Key of the bridge's seal inside ``mm_processor_kwargs`` (removed before processing).
SEAL_KEY = "tokenprune_seal"
#: Per-process key of the seal: never leaves the process, new at every start.
_SECRET = secrets.token_bytes(32)


def seal(fields: Mapping[str, Any]) -> str:
    """HMAC of validated pruning fields under this process's key."""
    msg = json.dumps(dict(fields), sort_keys=True).encode()
    return hmac.new(_SECRET, msg, hashlib.sha256).hexdigest()


class _SealedFloat(float):
    """A ratio whose seal was checked (JSON cannot produce this type)."""


class _SealedStr(str):
    """A method name (or ``"auto"``) whose seal was checked."""


class _SealedInt(int):
    """A ``max_visual_tokens`` whose seal was checked."""


class _SealedList(list):  # type: ignore[type-arg]
    """The per-image ``detail`` list whose seal was checked."""


_SEALED_TYPES = (_SealedFloat, _SealedStr, _SealedInt, _SealedList)


#: (JSON type, its sealed type): what the bridge writes, and what a checked value becomes.
_KINDS = ((str, _SealedStr), (list, _SealedList), (int, _SealedInt), (float, _SealedFloat))


def _sealed(value: Any, sealed: bool = True) -> Any:
    """``value`` as its sealed type (``sealed``) or back as the plain JSON type."""
    for plain, kind in _KINDS:
        if isinstance(value, plain):
            return (kind if sealed else plain)(value)
    return value


def check_sealed_kwargs(mm_processor_kwargs: Any) -> dict[str, Any] | None:
    """Verify and strip the bridge's seal from a request's ``mm_processor_kwargs`` (in place).

    Returns the kwargs that vLLM's own trust rule must still judge (everything but the sealed
    pruning keys), or raises ``VLLMValidationError`` when pruning keys are present without a
    valid seal. Idempotent: a checked request keeps its pruning values as sealed types, so a
    second render of the same request passes.
    """
    if not isinstance(mm_processor_kwargs, dict):
        return mm_processor_kwargs
    kw = mm_processor_kwargs
    ours = {f: kw[f] for f in SEALED_FIELDS if f in kw}
    if not ours and SEAL_KEY not in kw:
        return kw
    if SEAL_KEY in kw:
        given = kw.pop(SEAL_KEY)
        plain = {f: _sealed(v, sealed=False) for f, v in ours.items()}
        try:
            ok = isinstance(given, str) and hmac.compare_digest(given, seal(plain))
        except (TypeError, ValueError):
            ok = False
        if ok:
            for f, v in ours.items():
                kw[f] = _sealed(v)
    elif all(isinstance(v, _SEALED_TYPES) for v in ours.values()):
        ok = True
    else:
        ok = False
    if not ok:
        from vllm.exceptions import VLLMValidationError

        name = next(iter(ours), SEAL_KEY)
        raise VLLMValidationError(
            f"mm_processor_kwargs.{name}: pruning fields are accepted only at the top level of "
            "the request body (validated by the tokenprune bridge)",
            parameter=f"mm_processor_kwargs.{name}",
        )
    rest = {k: v for k, v in kw.items() if k not in SEALED_FIELDS}
    return rest or None


def _guarded(original: Callable[..., None]) -> Callable[..., None]:
    def validate_request_mm_kwargs(*, mm_processor_kwargs: Any, media_io_kwargs: Any,
                                   trust_request_mm_kwargs: bool) -> None:
        original(
            mm_processor_kwargs=check_sealed_kwargs(mm_processor_kwargs),
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    validate_request_mm_kwargs.__wrapped__ = original  # type: ignore[attr-defined]
    validate_request_mm_kwargs._tokenprune_guard = True  # type: ignore[attr-defined]
    return validate_request_mm_kwargs


_GUARDED_MODULES = ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")
_install_lock = threading.Lock()


def install_request_guard() -> None:
    """Wrap vLLM's per-request mm-kwargs check (see "vLLM internals touched" above)."""
    import importlib

    with _install_lock:
        for i, name in enumerate(_GUARDED_MODULES):
            try:
                module = importlib.import_module(name)
            except ImportError:
                if i == 0:
                    raise
                continue
            fn = getattr(module, "validate_request_mm_kwargs", None)
            if fn is None:
                raise RuntimeError(
                    f"vllm-tokenprune: {name}.validate_request_mm_kwargs not found in this vLLM "
                    "version; the request bridge cannot keep --trust-request-mm-kwargs intact, "
                    "so the server does not start")
            if not getattr(fn, "_tokenprune_guard", False):
                module.validate_request_mm_kwargs = _guarded(fn)  # type: ignore[attr-defined]
