"""Serving surface: the request-field bridge of the OpenAI-compatible API server.

A chat or completions request may carry, at the top level of its JSON body:

* ``prune_ratio`` (number in [0, 1)): fraction of each image's visual tokens to drop;
* ``video_prune_ratio`` (number in [0, 1)): the same for video items (default: ``prune_ratio``);
* ``prune_method`` (string): scorer for this request (one of ``token_prune.allowed_methods``).

:class:`TokenPruneMiddleware` (an ASGI middleware) validates them and moves them into the
request's ``mm_processor_kwargs``, which vLLM hashes into its multimodal cache keys and hands to
the model's processor. Bad values get HTTP 400 in vLLM's error format with ``param`` naming the
field; the engine never sees them.

Per-request ``mm_processor_kwargs`` are refused by vLLM unless the server trusts clients
(``--trust-request-mm-kwargs``), because arbitrary HF-processor options can change preprocessing
cost. The bridge keeps that guarantee while letting its own validated keys through: it enforces
vLLM's rule itself (a client-sent ``mm_processor_kwargs`` or ``media_io_kwargs`` is refused with
vLLM's message unless the server trusts clients) and lets the renderer accept the kwargs the
bridge wrote.

:class:`TokenPruneEndpointPlugin` is the ``vllm.endpoint_plugins`` entry point that installs the
middleware and adds ``GET /v1/tokenprune/config``. vLLM loads it when ``VLLM_PLUGINS`` names
``tokenprune``; a TokenPrune model refuses to start in an API server where it would not load
(see :func:`vllm_tokenprune.plugin.check_request_bridge`).
"""

from __future__ import annotations

import json
from argparse import Namespace
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
_STATE_KEY = "tokenprune"
_INLINE_BODY_BYTES = 256 * 1024


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


def rewrite_body(
    body: bytes, path: str, state: _BridgeState
) -> tuple[bytes | None, tuple[int, bytes] | None]:
    """Decide what happens to one request body.

    Returns ``(new_body, None)`` to forward ``new_body`` (``None``: unchanged), or
    ``(None, (status, json_bytes))`` to answer with an error.
    """
    has_prune = any(f.encode() in body for f in REQUEST_FIELDS)
    has_untrusted = any(k.encode() in body for k in _UNTRUSTED_KWARGS)
    if not has_prune and not has_untrusted:
        return None, None
    try:
        data = json.loads(body)
    except ValueError:
        return None, None  # vLLM answers malformed JSON itself
    if not isinstance(data, dict):
        return None, None

    if not state.trust_request_mm_kwargs:
        for key in _UNTRUSTED_KWARGS:
            if data.get(key):
                kind = "mm_processor_kwargs" if key == "mm_processor_kwargs" else "media_io_kwargs"
                return None, _error(
                    400,
                    f"Per-request {kind} are disabled by default because they can change "
                    "multimodal preprocessing resource usage. Start the server with "
                    "--trust-request-mm-kwargs only when clients are trusted.",
                    key,
                )

    fields = {f: data.pop(f) for f in REQUEST_FIELDS if f in data}
    if not fields:
        return None, None
    if path not in PRUNE_PATHS:
        name = next(iter(fields))
        return None, _error(400, f"{name}: not supported on {path}", name)
    if state.config is None:
        name = next(iter(fields))
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
    mm_kwargs = data.get("mm_processor_kwargs") or {}
    if not isinstance(mm_kwargs, dict):
        return None, _error(400, "mm_processor_kwargs: must be an object", "mm_processor_kwargs")
    mm_kwargs.update(validated)
    data["mm_processor_kwargs"] = mm_kwargs
    return json.dumps(data).encode(), None


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

        app.include_router(router)
        app.add_middleware(TokenPruneMiddleware)
        app.add_middleware(PruneDetailsMiddleware)
        metrics.enable_frontend()
        metrics.register_worker_collector()

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        bridge = _bridge_state(engine_client.vllm_config, args)
        if bridge.config is not None and not bridge.trust_request_mm_kwargs:
            # The middleware enforces vLLM's untrusted-kwargs rule on client input (above);
            # the renderer must accept the mm_processor_kwargs the bridge itself wrote.
            for obj in list(getattr(state, "_state", {}).values()):
                if hasattr(obj, "trust_request_mm_kwargs"):
                    obj.trust_request_mm_kwargs = True
        setattr(state, _STATE_KEY, bridge)
