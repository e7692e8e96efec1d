"""Serving surface: the request-field bridge of the OpenAI-compatible API server.

A chat or completions request may carry, at the top level of its JSON body:

* ``prune_ratio`` (number in [0, 1)): fraction of each image's visual tokens to drop;
* ``video_prune_ratio`` (number in [0, 1)): the same for video items (default: ``prune_ratio``);
* ``prune_method`` (string): scorer for this request (one of ``token_prune.allowed_methods``).

:class:`TokenPruneMiddleware` (an ASGI middleware) parses every JSON ``POST`` body on every
route with the same parser vLLM uses (:func:`json.loads`, so JSON escapes such as
``"prune\u005fratio"`` are seen exactly as vLLM sees them), validates the fields and moves them
into the request's ``mm_processor_kwargs``, which vLLM hashes into its multimodal cache keys and
hands to the model's processor. Bad values, a guarded key given twice, pruning fields inside
``extra_body`` or a client-sent ``mm_processor_kwargs``, and pruning fields on routes that
cannot prune get HTTP 400 in vLLM's error format with ``param`` naming the field; the engine
never sees them.

Per-request ``mm_processor_kwargs`` are refused by vLLM unless the server trusts clients
(``--trust-request-mm-kwargs``), because arbitrary HF-processor options change preprocessing
cost. The bridge never switches that check off. It seals the kwargs it writes with an HMAC
under a per-process random key (``tokenprune_seal``, never sent to clients), and
:func:`install_request_guard` wraps vLLM's check so that exactly the sealed pruning keys, with
exactly the values the bridge validated, are exempt; everything else in ``mm_processor_kwargs``
still goes through vLLM's own rule. Pruning keys in ``mm_processor_kwargs`` without a valid seal
(a bypassed or missing bridge) are refused with a 400, and the model's processor validates the
values again, so no path serves a request with a value the bridge would have refused.

:class:`TokenPruneEndpointPlugin` is the ``vllm.endpoint_plugins`` entry point that installs the
middleware and the guard and adds ``GET /v1/tokenprune/config`` (read-only: the served
``token_prune`` block, the method names and the field names; it sits behind ``--api-key`` like
vLLM's own routes). vLLM loads it when ``VLLM_PLUGINS`` names ``tokenprune``; a TokenPrune model
refuses to start in an API server where it would not load (see
:func:`vllm_tokenprune.plugin.check_request_bridge`).

vLLM internals touched (also in :data:`vllm_tokenprune._vllm_internals.INTERNALS`)
-------------------------------------------------------------------------------------
* ``vllm.renderers.online_renderer.validate_request_mm_kwargs`` (module global, rebound to a
  wrapper) and, when that module is importable, the same name in
  ``vllm.entrypoints.pooling.base.serving``: the only places vLLM applies
  ``--trust-request-mm-kwargs`` to online requests. The wrapper exempts the sealed pruning keys
  and calls vLLM's own function on the rest. If the name is missing (vLLM moved it), the server
  refuses to start rather than serve without the guard.
* ``VLLMValidationError`` (``vllm.exceptions``): raised by the wrapper so vLLM answers 400 with
  ``param`` set.
* ``app.state`` of vLLM's FastAPI app: the bridge keeps its state under ``app.state.tokenprune``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from argparse import Namespace
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request

from vllm_tokenprune import metrics
from vllm_tokenprune.config import (
    REQUEST_FIELDS,
    RequestFieldError,
    TokenPruneConfig,
    config_from_hf_config,
    parse_request_fields,
)
from vllm_tokenprune.response import PruneDetailsMiddleware
from vllm_tokenprune.scoring import list_methods

#: Routes whose JSON body may carry the pruning fields.
PRUNE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_UNTRUSTED_KWARGS = ("mm_processor_kwargs", "media_io_kwargs")
#: Top-level keys that may not appear twice in a body (JSON's last-wins would hide one).
GUARDED_KEYS = (*REQUEST_FIELDS, *_UNTRUSTED_KWARGS, "extra_body")
#: Key of the bridge's seal inside ``mm_processor_kwargs`` (removed before processing).
SEAL_KEY = "tokenprune_seal"
_STATE_KEY = "tokenprune"
_INLINE_BODY_BYTES = 256 * 1024
#: Per-process key of the seal: never leaves the process, new at every start.
_SECRET = secrets.token_bytes(32)


class _BridgeState:
    """What the middleware needs to know about the served model (set in ``init_state``)."""

    def __init__(self, config: TokenPruneConfig | None, trust_request_mm_kwargs: bool,
                 architectures: list[str]) -> None:
        self.config = config  # None: the model is not a TokenPrune architecture
        self.trust_request_mm_kwargs = trust_request_mm_kwargs
        self.architectures = architectures


def _error(status: int, message: str, param: str | None) -> tuple[int, bytes]:
    body = {
        "error": {
            "message": message,
            "type": "BadRequestError",
            "param": param,
            "code": status,
        }
    }
    return status, json.dumps(body).encode()


def seal(fields: Mapping[str, Any]) -> str:
    """HMAC of validated pruning fields under this process's key."""
    msg = json.dumps(dict(fields), sort_keys=True).encode()
    return hmac.new(_SECRET, msg, hashlib.sha256).hexdigest()


class _Obj(dict):
    """A parsed JSON object that remembers which of its keys appeared more than once."""

    dups: frozenset[str] = frozenset()


def _pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.dups = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _untrusted_message(key: str) -> str:
    what = "multimodal " + ("preprocessing" if key == "mm_processor_kwargs" else "media loading")
    return (f"Per-request {key} are disabled by default because they can change {what} resource "
            "usage. Start the server with --trust-request-mm-kwargs only when clients are "
            "trusted.")


def rewrite_body(
    body: bytes, path: str, state: _BridgeState
) -> tuple[bytes | None, tuple[int, bytes] | None]:
    """Decide what happens to one request body.

    Returns ``(new_body, None)`` to forward ``new_body`` (``None``: unchanged), or
    ``(None, (status, json_bytes))`` to answer with an error.
    """
    try:
        data = json.loads(body, object_pairs_hook=_pairs)
    except ValueError:
        return None, None  # not JSON: vLLM answers it itself (its parser is the same)
    except RecursionError:  # vLLM's parser would fail the same way, with a 500
        return None, _error(400, "request body: JSON nested too deeply", None)
    if not isinstance(data, _Obj):
        return None, None

    for key in GUARDED_KEYS:
        if key in data.dups:
            return None, _error(400, f"{key}: given more than once in the request body", key)

    extra = data.get("extra_body")
    if isinstance(extra, dict):
        for f in (*REQUEST_FIELDS, *_UNTRUSTED_KWARGS):
            if f in extra:
                return None, _error(
                    400, f"extra_body.{f}: send {f} at the top level of the request body (the "
                    "openai client's extra_body= argument puts it there)", f"extra_body.{f}")

    client_kwargs = data.get("mm_processor_kwargs")
    if isinstance(client_kwargs, _Obj):
        for f in (*REQUEST_FIELDS, SEAL_KEY):
            if f in client_kwargs or f in client_kwargs.dups:
                return None, _error(
                    400, f"mm_processor_kwargs.{f}: not accepted inside mm_processor_kwargs; "
                    + (f"send {f} at the top level of the request body" if f != SEAL_KEY
                       else "reserved for the tokenprune bridge"),
                    f"mm_processor_kwargs.{f}")

    if not state.trust_request_mm_kwargs:
        for key in _UNTRUSTED_KWARGS:
            if data.get(key):
                return None, _error(400, _untrusted_message(key), key)

    fields = {f: data.pop(f) for f in REQUEST_FIELDS if f in data}
    if not fields:
        return None, None
    name = next(iter(fields))
    if path not in PRUNE_PATHS:
        return None, _error(
            400, f"{name}: not supported on {path} (only on {', '.join(sorted(PRUNE_PATHS))})",
            name)
    if state.config is None:
        return None, _error(
            400,
            f"{name}: this server's model ({', '.join(state.architectures) or 'unknown'}) is not "
            "served with a TokenPrune architecture, so it cannot prune visual tokens. Serve it "
            'with --hf-overrides \'{"architectures": ["TokenPrune<Architecture>"]}\'.',
            name,
        )
    try:
        validated = parse_request_fields(fields, state.config)
    except RequestFieldError as e:
        return None, _error(400, str(e), e.field)
    mm_kwargs = client_kwargs if client_kwargs is not None else {}
    if not isinstance(mm_kwargs, dict):
        return None, _error(400, "mm_processor_kwargs: must be an object", "mm_processor_kwargs")
    mm_kwargs.update(validated)
    mm_kwargs[SEAL_KEY] = seal(validated)
    data["mm_processor_kwargs"] = mm_kwargs
    return json.dumps(data).encode(), None


class _SealedFloat(float):
    """A ratio whose seal was checked (JSON cannot produce this type)."""


class _SealedStr(str):
    """A method name whose seal was checked."""


def _sealed(value: Any) -> Any:
    return _SealedStr(value) if isinstance(value, str) else _SealedFloat(value)


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
    ours = {f: kw[f] for f in REQUEST_FIELDS if f in kw}
    if not ours and SEAL_KEY not in kw:
        return kw
    if SEAL_KEY in kw:
        given = kw.pop(SEAL_KEY)
        plain = {f: (str(v) if isinstance(v, str) else v) for f, v in ours.items()}
        try:
            ok = isinstance(given, str) and hmac.compare_digest(given, seal(plain))
        except (TypeError, ValueError):
            ok = False
        if ok:
            for f, v in ours.items():
                kw[f] = _sealed(v)
    elif all(isinstance(v, (_SealedFloat, _SealedStr)) for v in ours.values()):
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
    rest = {k: v for k, v in kw.items() if k not in REQUEST_FIELDS}
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


class TokenPruneMiddleware:
    """ASGI middleware: validate the pruning fields and move them into ``mm_processor_kwargs``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        state = getattr(getattr(scope.get("app"), "state", None), _STATE_KEY, None)
        if state is None:  # before init_state (or another app): nothing to enforce
            await self.app(scope, receive, send)
            return

        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)

        path = scope.get("path", "")
        if len(body) > _INLINE_BODY_BYTES:
            # Parsing a multi-megabyte JSON body (inline base64 images) would stall the event
            # loop that serves every other request: do it in a worker thread.
            import anyio.to_thread

            new_body, error = await anyio.to_thread.run_sync(rewrite_body, body, path, state)
        else:
            new_body, error = rewrite_body(body, path, state)
        if error is not None:
            status, payload = error
            await send({
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())],
            })
            await send({"type": "http.response.body", "body": payload})
            return
        if new_body is not None:
            body = new_body
            headers = [
                (k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            scope = dict(scope, headers=headers)

        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _bridge_state(vllm_config: Any, args: Namespace | None) -> _BridgeState:
    from vllm_tokenprune.plugin import ARCHITECTURES

    model_config = vllm_config.model_config
    archs = list(getattr(model_config, "architectures", None) or [])
    pruned = any(a in ARCHITECTURES for a in archs)
    config = config_from_hf_config(model_config.hf_config) if pruned else None
    trust = bool(getattr(args, "trust_request_mm_kwargs", False))
    return _BridgeState(config, trust, archs)


class TokenPruneEndpointPlugin:
    """``vllm.endpoint_plugins`` entry point (enable with ``VLLM_PLUGINS=tokenprune``)."""

    name = "tokenprune"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        router = APIRouter()

        @router.get("/v1/tokenprune/config")
        async def tokenprune_config(request: Request) -> dict[str, Any]:
            state: _BridgeState | None = getattr(request.app.state, _STATE_KEY, None)
            cfg = state.config if state is not None else None
            return {
                "enabled": cfg is not None,
                "config": cfg.model_dump() if cfg is not None else None,
                "methods": list_methods(),
                "request_fields": list(REQUEST_FIELDS),
            }

        install_request_guard()
        app.include_router(router)
        app.add_middleware(TokenPruneMiddleware)
        app.add_middleware(PruneDetailsMiddleware)
        metrics.enable_frontend()
        metrics.register_worker_collector()

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        bridge = _bridge_state(engine_client.vllm_config, args)
        install_request_guard()
        setattr(state, _STATE_KEY, bridge)
