"""Serving surface: the request-field bridge of the OpenAI-compatible API server.

A chat or completions request may carry, at the top level of its JSON body:

* ``prune_ratio`` (number in [0, 1)): fraction of each image's visual tokens to drop;
* ``video_prune_ratio`` (number in [0, 1)): the same for video items (default: ``prune_ratio``);
* ``prune_method`` (string): scorer for this request (one of ``token_prune.allowed_methods``).

:class:`TokenPruneMiddleware` (an ASGI middleware) validates the fields and moves them into
the request's ``mm_processor_kwargs``, which vLLM hashes into its multimodal cache keys and
hands to the model's processor. Bad values, a guarded key given twice, pruning fields inside
``extra_body`` or a client-sent ``mm_processor_kwargs``, and pruning fields on routes that
cannot prune get HTTP 400 in vLLM's error format with ``param`` naming the field; the engine
never sees them.

What it reads, and when (the reading rule): only the body of a ``POST`` that vLLM's own app
routes to a route whose body it parses as JSON (Starlette's matching, so the root path is
removed exactly as vLLM removes it, :func:`json_route`), with the media type vLLM accepts
there, and only after vLLM's ``--api-key`` check (which wraps the bridge; :class:`_AuthCheck`).
Everything else (unknown paths, wrong methods, unauthenticated requests, multipart uploads,
routes that take no body) goes through unread, so the bridge reads no byte vLLM would not read
itself. It holds the body once, as the one ``bytes`` object it hands on. Before any parse it
scans the bytes for the guarded keys (:func:`maybe_guarded`: every plain spelling contains
``prune_``, ``_kwargs`` or ``extra_body``; any ``\\u`` escape or a UTF-16/32 body counts as a
maybe); then it parses with the parser vLLM uses (:func:`json.loads`, so an escaped key is the
key vLLM sees), and only when a guarded key is present at the top level does it check for
duplicates (a second, C-speed parse, :func:`_duplicated`).

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
* vLLM's ``AuthenticationMiddleware`` (its order in ``app.user_middleware``, ``verify_token``,
  ``GUARDED_PREFIX``) and the name of its ``validate_json_request`` dependency: the reading rule.
* ``ServingTokens._validate_mm_cache_handles`` (wrapped, :mod:`vllm_tokenprune.features`):
  pruning rows in client-supplied ``features`` on ``/inference/v1/generate``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
import threading
from argparse import Namespace
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request

from vllm_tokenprune import metrics
from vllm_tokenprune.config import (
    REQUEST_FIELDS,
    OversizedInteger,
    RequestFieldError,
    TokenPruneConfig,
    config_from_hf_config,
    parse_request_fields,
)
from vllm_tokenprune.features import install_features_guard
from vllm_tokenprune.response import PruneDetailsMiddleware, matched_route
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


#: Byte strings one of which every spelling of a guarded key without a JSON escape contains
#: (the three pruning fields, the two kwargs, ``extra_body``): a body without any of them and
#: without a ``\\u`` escape cannot carry a guarded key, so it is handed on unparsed. Each holds
#: an underscore, the anchor the scan looks for first.
_KEY_MARKS = (b"prune_", b"_kwargs", b"extra_body")
#: Anchors visited one by one (``memchr`` speed) before the scan falls back to substring
#: searches over the rest of the body.
_FEW_ANCHORS = 512


def _has_any(body: bytes, anchor: bytes, marks: tuple[bytes, ...]) -> bool:
    """Whether ``body`` contains one of ``marks`` (each containing the one-byte ``anchor``).

    Visits the anchor's occurrences with ``bytes.find`` (``memchr``: a base64 image has no
    underscore and no backslash, so this is one pass at memory speed) and checks the marks
    around each; past :data:`_FEW_ANCHORS` occurrences, searches the rest for the marks."""
    offsets = [(mark, mark.index(anchor)) for mark in marks]
    find = body.find
    pos = find(anchor)
    visited = 0
    while pos >= 0:
        for mark, off in offsets:
            if pos >= off and body.startswith(mark, pos - off):
                return True
        visited += 1
        if visited > _FEW_ANCHORS:
            start = max(0, pos - max(len(m) for m in marks))
            return any(find(mark, start) >= 0 for mark in marks)
        pos = find(anchor, pos + 1)
    return False


def maybe_guarded(body: bytes) -> bool:
    """Whether ``body`` may carry a guarded key at all (a byte scan, no parse, no copy).

    JSON spells a key either plainly or with ``\\uXXXX`` escapes (no other escape yields a
    letter, digit or underscore), so: any ``\\u`` escape anywhere counts as "maybe"; so does a
    body in UTF-16/32, which the parser vLLM uses (``json.loads`` on bytes) also accepts.
    """
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return True
    return _has_any(body, b"\\", (b"\\u",)) or _has_any(body, b"_", _KEY_MARKS)


def _parse_int(text: str) -> int | OversizedInteger:
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    return OversizedInteger(digits) if limit and digits > limit else int(text)


def _load(body: bytes) -> tuple[Any, bool]:
    """``json.loads(body)`` as vLLM parses it; plus whether integer literals too long for
    Python's ``int`` were replaced by :class:`OversizedInteger` (vLLM's own parse of such a body
    fails, so the body is only ever refused, never forwarded)."""
    try:
        return json.loads(body), False
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer literal past sys.get_int_max_str_digits()
        if "integer string conversion" not in str(e):
            raise
        return json.loads(body, parse_int=_parse_int), True


def _duplicated(body: bytes, present: list[str], oversized: bool = False) -> str | None:
    """The first guarded key of ``present`` given more than once at the top level of ``body``.

    JSON's last-wins would hide the first value. Cheap when each such key is spelled once and
    without escapes; otherwise one more parse that keeps every member (``object_pairs_hook=
    tuple``: objects become tuples of pairs, no Python call per object)."""
    if b"\\u" not in body and all(body.count(b'"%s"' % k.encode()) == 1 for k in present):
        return None
    pairs = json.loads(body, object_pairs_hook=tuple,
                       **({"parse_int": _parse_int} if oversized else {}))
    keys = [k for k, _ in pairs] if isinstance(pairs, tuple) else []
    return next((k for k in present if keys.count(k) > 1), None)


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
    if not maybe_guarded(body):
        return None, None
    try:
        data, oversized = _load(body)
    except RecursionError:  # vLLM's parser would fail the same way, with a 500
        return None, _error(400, "request body: JSON nested too deeply", None)
    except ValueError:
        return None, None  # not JSON: vLLM answers it itself (its parser is the same)
    if not isinstance(data, dict):
        return None, None

    present = [k for k in GUARDED_KEYS if k in data]
    if present:
        try:
            dup = _duplicated(body, present, oversized)
        except RecursionError:
            return None, _error(400, "request body: JSON nested too deeply", None)
        if dup is not None:
            return None, _error(400, f"{dup}: given more than once in the request body", dup)

    extra = data.get("extra_body")
    if isinstance(extra, dict):
        for f in (*REQUEST_FIELDS, *_UNTRUSTED_KWARGS):
            if f in extra:
                return None, _error(
                    400, f"extra_body.{f}: send {f} at the top level of the request body (the "
                    "openai client's extra_body= argument puts it there)", f"extra_body.{f}")

    client_kwargs = data.get("mm_processor_kwargs")
    if isinstance(client_kwargs, dict):
        for f in (*REQUEST_FIELDS, SEAL_KEY):
            if f in client_kwargs:
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
    if oversized:  # valid fields, but vLLM refuses this body: let it answer
        return None, None
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


def _content_type(scope: Mapping[str, Any]) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-type":
            return value.decode("latin-1")
    return None


def _json_check(route: Any) -> tuple[bool, bool]:
    """(whether vLLM parses the route's body as JSON, whether it requires the exact media type
    ``application/json`` first). Cached on the route object."""
    cached = getattr(route, "_tokenprune_json", None)
    if cached is not None:
        return cached
    dependant = getattr(route, "dependant", None)
    strict = False
    stack = list(getattr(dependant, "dependencies", ()))
    while stack:
        dep = stack.pop()
        strict |= getattr(dep.call, "__name__", "") == "validate_json_request"
        stack.extend(dep.dependencies)
    reads = dependant is not None and (getattr(route, "body_field", None) is not None or strict)
    result = (reads, strict)
    try:
        route._tokenprune_json = result
    except AttributeError:
        pass
    return result


def json_route(scope: dict[str, Any]) -> str | None:
    """The path of the route vLLM dispatches this request to, when that route parses the body
    as JSON and vLLM's own checks would let the body through; otherwise None (the body is not
    read).

    Routing is Starlette's own (:func:`vllm_tokenprune.response.matched_route`: the root path
    removed, path parameters, methods). The media-type rule is vLLM's and FastAPI's: routes with
    vLLM's ``validate_json_request`` need exactly ``application/json`` (a body sent as anything
    else is refused before it is used, so its fields never reach the engine); other body routes
    parse JSON when the type is absent, ``application/json`` or ``application/*+json``.
    Multipart and form bodies (vLLM's audio routes) are therefore never read here.
    """
    route = matched_route(scope)
    if route is None:
        return None
    reads, strict = _json_check(route)
    if not reads:
        return None
    ctype = _content_type(scope)
    if strict:  # vllm.entrypoints.serve.utils.api_utils.validate_json_request
        ok = ctype is not None and ctype.lower().split(";", 1)[0] == "application/json"
    elif ctype is None or not ctype.strip():
        ok = True
    else:
        main, _, sub = ctype.lower().split(";", 1)[0].strip().partition("/")
        ok = main == "application" and (sub == "json" or sub.endswith("+json"))
    return route.path if ok else None


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
        state = getattr(getattr(scope.get("app"), "state", None), _STATE_KEY, None)
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


#: Server flags that serve ``POST /inference/v1/generate`` with client-supplied ``features``.
FEATURE_FLAGS = ("enable_scale_out", "tokens_only")


def check_features_guard(bridge: _BridgeState, args: Namespace | None) -> None:
    """Refuse to start a TokenPrune server that takes precomputed features
    (``--enable-scale-out``, ``--tokens-only``) when their pruning rows cannot be checked."""
    flags = [f for f in FEATURE_FLAGS if getattr(args, f, False)]
    if bridge.config is None or not flags or install_features_guard():
        return
    raise RuntimeError(
        f"vllm-tokenprune: --{flags[0].replace('_', '-')} serves /inference/v1/generate with "
        "client-supplied features, whose pruning rows this vLLM version gives the plugin no "
        f"place to check ({_FEATURES_INTERNAL}); start the server without it")


_FEATURES_INTERNAL = "ServingTokens._validate_mm_cache_handles"


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
        install_features_guard()
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
        check_features_guard(bridge, args)
        setattr(state, _STATE_KEY, bridge)
