"""The request-field bridge: an ASGI middleware that validates the pruning fields of a chat or
completions body and moves them into its ``mm_processor_kwargs`` (runs in the API server).

A chat or completions request may carry, at the top level of its JSON body:

* ``prune_ratio`` (number in [0, 1)): fraction of each image's visual tokens to drop;
* ``video_prune_ratio`` (number in [0, 1)): the same for video items (default: ``prune_ratio``);
* ``prune_method`` (string): scorer for this request (one of ``token_prune.allowed_methods``);
* ``max_visual_tokens`` (integer >= 1): the most visual tokens the request's items keep in all;

and, on the chat route, each image part may carry OpenAI's ``image_url.detail`` (``"low"``,
``"high"``, ``"auto"``): the bridge reads it per image, in the order vLLM's chat parser numbers
the request's images (:func:`image_details`), and hands the list on as ``image_detail``
(``"auto"``/absent: None; a request whose images all say ``"auto"`` is forwarded unchanged, so it
is exactly the request without the field). Only a TokenPrune server reads ``detail``; any other
server leaves it to vLLM, which ignores it.

:class:`TokenPruneMiddleware` validates the fields and moves them into the request's
``mm_processor_kwargs``, which vLLM hashes into its multimodal cache keys and hands to the
model's processor, sealed (:mod:`.seal`). Bad values, a guarded key given twice, pruning fields
inside ``extra_body`` or a client-sent ``mm_processor_kwargs``, and pruning fields on routes
that cannot prune get HTTP 400 in vLLM's error format with ``param`` naming the field; the
engine never sees them. Which bodies it reads at all, and how it parses them: :mod:`.reading`.
It holds the body once, as the one ``bytes`` object it hands on.

vLLM internals touched (also in :data:`vllm_tokenprune._vllm_internals.INTERNALS`): ``app.state``
of vLLM's FastAPI app (the bridge keeps its state under ``app.state.tokenprune``); vLLM's
``AuthenticationMiddleware`` (its order in ``app.user_middleware``, ``verify_token``,
``GUARDED_PREFIX``): :class:`_AuthCheck`.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_tokenprune.config import (
    DETAIL_KEY,
    REQUEST_FIELDS,
    SEALED_FIELDS,
    RequestFieldError,
    TokenPruneConfig,
    check_detail,
    parse_request_fields,
)
from vllm_tokenprune.serving.reading import (
    GUARDED_KEYS,
    UNTRUSTED_KWARGS,
    duplicated,
    json_route,
    load,
    maybe_guarded,
)
from vllm_tokenprune.serving.seal import SEAL_KEY, seal

#: Routes whose JSON body may carry the pruning fields.
PRUNE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
#: The route whose messages may carry ``image_url.detail``.
CHAT_PATH = "/v1/chat/completions"
#: Content-part types vLLM's chat parser (``vllm.renderers.chat_utils.MM_PARSER_MAP``) turns
#: into one image item / one video item each; a part without ``type`` is typed by its key.
IMAGE_PARTS = ("image_url", "input_image", "image_embeds", "image_pil")
VIDEO_PARTS = ("video_url", "video_embeds")


def _part_kind(part: Any) -> str | None:
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind is None or part.get("uuid") is not None:
        kind = next((k for k in (*IMAGE_PARTS, *VIDEO_PARTS) if k in part), None)
    return kind if isinstance(kind, str) else None


def image_details(messages: Any) -> tuple[list[str | None], int]:
    """Each image item's ``detail`` (None for ``"auto"`` or absent), in the order vLLM's chat
    parser adds the request's images (message order, then part order), and the number of media
    items (images and videos). RequestFieldError naming the part for a bad value."""
    details: list[str | None] = []
    items = 0
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            kind = _part_kind(part)
            if kind in VIDEO_PARTS:
                items += 1
            if kind not in IMAGE_PARTS:
                continue
            items += 1
            url = part.get("image_url")
            if isinstance(url, dict) and "detail" in url:
                where = f"messages[{i}].content[{j}].image_url.detail"
                details.append(check_detail(url["detail"], where))
            elif kind == "input_image" and "detail" in part:
                details.append(check_detail(part["detail"], f"messages[{i}].content[{j}].detail"))
            else:
                details.append(None)
    return details, items
STATE_KEY = "tokenprune"
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


def _untrusted_message(key: str) -> str:
    what = "multimodal " + ("preprocessing" if key == "mm_processor_kwargs" else "media loading")
    return (f"Per-request {key} are disabled by default because they can change {what} resource "
            "usage. Start the server with --trust-request-mm-kwargs only when clients are "
            "trusted.")


def rewrite_body(
    body: bytes, path: str, state: _BridgeState
) -> tuple[bytes | None, tuple[int, bytes] | None]:
    """Decide what happens to one request body sent to the route ``path`` (the route's own
    path, after the root path is removed).

    Returns ``(new_body, None)`` to forward ``new_body`` (``None``: unchanged), or
    ``(None, (status, json_bytes))`` to answer with an error.
    """
    # a TokenPrune server also reads the chat parts' detail (a plain byte search first)
    detail_route = state.config is not None and path == CHAT_PATH
    if not maybe_guarded(body) and not (detail_route and b"detail" in body):
        return None, None
    try:
        data, oversized = load(body)
    except RecursionError:  # vLLM's parser would fail the same way, with a 500
        return None, _error(400, "request body: JSON nested too deeply", None)
    except ValueError:
        return None, None  # not JSON: vLLM answers it itself (its parser is the same)
    if not isinstance(data, dict):
        return None, None

    present = [k for k in GUARDED_KEYS if k in data]
    if present:
        try:
            dup = duplicated(body, present, oversized)
        except RecursionError:
            return None, _error(400, "request body: JSON nested too deeply", None)
        if dup is not None:
            return None, _error(400, f"{dup}: given more than once in the request body", dup)

    extra = data.get("extra_body")
    if isinstance(extra, dict):
        for f in (*REQUEST_FIELDS, *UNTRUSTED_KWARGS):
            if f in extra:
                return None, _error(
                    400, f"extra_body.{f}: send {f} at the top level of the request body (the "
                    "openai client's extra_body= argument puts it there)", f"extra_body.{f}")

    client_kwargs = data.get("mm_processor_kwargs")
    if isinstance(client_kwargs, dict):
        for f in (*SEALED_FIELDS, SEAL_KEY):
            if f in client_kwargs:
                return None, _error(
                    400, f"mm_processor_kwargs.{f}: not accepted inside mm_processor_kwargs; "
                    + (f"send {f} at the top level of the request body" if f != SEAL_KEY
                       else "reserved for the tokenprune bridge"),
                    f"mm_processor_kwargs.{f}")

    if not state.trust_request_mm_kwargs:
        for key in UNTRUSTED_KWARGS:
            if data.get(key):
                return None, _error(400, _untrusted_message(key), key)

    fields = {f: data.pop(f) for f in REQUEST_FIELDS if f in data}
    num_items = 0
    if detail_route:
        try:
            details, num_items = image_details(data.get("messages"))
        except RequestFieldError as e:
            return None, _error(400, str(e), e.field)
        if any(d is not None for d in details):
            fields[DETAIL_KEY] = details
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
    cap = validated.get("max_visual_tokens")
    if cap is not None and num_items and cap < num_items * state.config.min_keep:
        return None, _error(
            400, f"max_visual_tokens: {cap} is below what the request's {num_items} media items "
            f"keep at least (token_prune.min_keep = {state.config.min_keep} each)",
            "max_visual_tokens")
    if oversized:  # valid fields, but vLLM refuses this body: let it answer
        return None, None
    mm_kwargs = client_kwargs if client_kwargs is not None else {}
    if not isinstance(mm_kwargs, dict):
        return None, _error(400, "mm_processor_kwargs: must be an object", "mm_processor_kwargs")
    mm_kwargs.update(validated)
    mm_kwargs[SEAL_KEY] = seal(validated)
    data["mm_processor_kwargs"] = mm_kwargs
    return json.dumps(data).encode(), None


class _AuthCheck:
    """vLLM's ``--api-key`` check, applied before the bridge reads a body.

    vLLM's ``AuthenticationMiddleware`` is added after the endpoint plugins, so it wraps the
    bridge and answers 401 before the bridge sees the request; this object verifies that order
    once per app and, should a vLLM version invert it, applies the same check itself (vLLM's own
    ``verify_token`` and guarded prefixes), so an unauthenticated body is never read.
    """

    def __init__(self) -> None:
        self._apps: dict[int, Any] = {}

    def _verifier(self, app: Any) -> Any:
        key = id(app)
        if key not in self._apps:
            self._apps[key] = _auth_verifier(app)
        return self._apps[key]

    def refused(self, scope: dict[str, Any]) -> bool:
        verifier = self._verifier(scope.get("app"))
        if verifier is None:
            return False
        from starlette.datastructures import Headers

        prefixes, middleware = verifier
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        return path.startswith(prefixes) and not middleware.verify_token(Headers(scope=scope))


def _auth_verifier(app: Any) -> tuple[tuple[str, ...], Any] | None:
    """None when vLLM's key check runs before the bridge (or no key is set); else what the
    bridge needs to apply it itself."""
    entries = list(getattr(app, "user_middleware", None) or ())
    classes = [getattr(m, "cls", None) for m in entries]
    try:
        from vllm.entrypoints.serve.middleware.authenticate import (
            GUARDED_PREFIX,
            AuthenticationMiddleware,
        )
    except ImportError:  # vLLM moved it: apply no check of our own, see _vllm_internals
        return None
    if AuthenticationMiddleware not in classes:
        return None
    auth = classes.index(AuthenticationMiddleware)
    ours = classes.index(TokenPruneMiddleware) if TokenPruneMiddleware in classes else len(classes)
    if auth < ours:  # user_middleware[0] is the outermost: vLLM's check runs first
        return None
    entry = entries[auth]
    return tuple(GUARDED_PREFIX), AuthenticationMiddleware(None, *entry.args, **entry.kwargs)


class TokenPruneMiddleware:
    """ASGI middleware: validate the pruning fields and move them into ``mm_processor_kwargs``.

    Reads a body only where vLLM itself would parse it as JSON (:func:`json_route`) and after
    vLLM's ``--api-key`` check (:class:`_AuthCheck`); every other request goes through untouched
    and unread (an unknown path, a wrong method, a GET, a multipart upload). It holds one copy of
    a body at most and lets go of it when it hands the body on.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._auth = _AuthCheck()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        state = getattr(getattr(scope.get("app"), "state", None), STATE_KEY, None)
        path = None if state is None else json_route(scope)
        if path is None or self._auth.refused(scope):
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        del message
        # one bytes object: Starlette's Request.body() joins a one-element list without a copy
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks

        if len(body) > _INLINE_BODY_BYTES:
            # A large body (inline base64 media): the scan and any parse run in a worker
            # thread, so the event loop gets the GIL between their steps.
            import anyio.to_thread

            new_body, error = await anyio.to_thread.run_sync(rewrite_body, body, path, state)
        else:
            new_body, error = rewrite_body(body, path, state)
        if error is not None:
            del body
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
        del new_body
        pending = [body]  # the only reference: handed on, then gone
        del body

        async def replay() -> dict[str, Any]:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
