"""Per-request pruning details in chat and completions responses (the ``token_prune`` field;
runs in the API server).

A response to a request whose media went through a TokenPrune model carries, next to
``usage``, what happened to its media::

    "usage": {"prompt_tokens": 52, ...},
    "token_prune": {
      "method": "lrcp",
      "ratios": {"image": 0.889},
      "tokens": 192, "kept": 21,
      "items": [{"modality": "image", "index": 0, "tokens": 192, "kept": 21, "why": "ratio"}]
    }

``tokens``/``kept`` count the visual tokens the scorer chose from and the ones the language
model got, per item (``index``: the item's place among its modality's items in the prompt) and
summed; ``why`` says what decided an item's count (``"ratio"``, ``"auto"``, ``"detail"``,
``"cap"``: :data:`vllm_tokenprune.plan.REASONS`, docs/budgets.md); ``ratios`` holds ``"auto"``
for a modality whose counts ``prune_ratio: "auto"`` chose, and a capped request's field has
``max_visual_tokens``; ``tokens - kept`` is exactly what pruning took off
``usage.prompt_tokens``. LLaVA-NeXT's
image-newline tokens are always kept and counted in neither. A request without media (or on a
model that is not a TokenPrune architecture) gets no ``token_prune`` field. Layer-wise routing
(``alvts``) drops nothing at the input (``kept`` = ``tokens``); its items also carry
``routed_per_layer`` (visual tokens that go through each routed layer) and ``routed_layers``,
and the field ``skipped_token_layers`` (their ``(tokens - routed_per_layer) x routed_layers``,
summed).

Placement follows vLLM's own extensions of the OpenAI schema: extra top-level fields of the
response object (vLLM adds ``prompt_logprobs``, ``kv_transfer_params``, ``metrics``), which the
``openai`` client keeps in ``model_extra`` and every client that ignores unknown fields skips.
Streamed responses carry it on the final usage chunk (``choices: []``), where vLLM puts its
own per-request ``metrics``; like those, a stream without ``stream_options.include_usage`` (or
the server's ``--enable-force-include-usage``) has no usage chunk and no ``token_prune``: no
chunk a client did not ask for is added, and no content chunk changes shape.

How the counts reach the response: they are exact in the API server, where the model's
processor fixes each item's keep-count in its plan before the encoder runs (the same plans the
Prometheus counters read, including items served from vLLM's processor cache).
:class:`PruneDetailsMiddleware` puts a fresh :class:`RequestDetails` in a context variable
before the route runs; the processor reports its plans into it (:func:`note_plans`). vLLM runs the
processor in a thread pool (``loop.run_in_executor``, which does not carry context variables),
so the middleware makes the renderer's thread pools run each job inside a copy of the
submitting task's context (:func:`propagate_context`), as ``asyncio.to_thread`` does.

The kept *indices* are not returned: they exist only in the worker, after the encoder ran in
the engine's batched step, and vLLM has no channel from a model's ``embed_multimodal`` back
to one request's output. Carrying them would take a device-to-host copy per item plus an
inter-process message per request on the hot path. ``python -m vllm_tokenprune.preview``
shows the kept set for an image, prompt, method and ratio offline, from the same weights and
scorers (see docs/visibility.md).
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterable, Sequence
from typing import Any

from vllm_tokenprune.log import init_logger
from vllm_tokenprune.plan import ItemPlan

logger = init_logger(__name__)

#: Response field name.
FIELD = "token_prune"
#: Routes whose responses get the field (route paths: compared after the root path is removed).
DETAIL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_BRIDGE_STATE_KEY = "tokenprune"
_ROUTE_KEY = "tokenprune.route"
_UNSET = object()


def matched_route(scope: dict[str, Any]) -> Any:
    """The route vLLM's app dispatches this request to, or None (a 404 or 405, a mount).

    Starlette's own matching (``Route.matches``: the root path removed as its router removes
    it, path parameters, methods), so ``--root-path /api`` and a proxy that strips the prefix
    route alike. The first full match wins, as in Starlette's router. Remembered in the scope,
    so the bridge and this module match once per request.
    """
    cached = scope.get(_ROUTE_KEY, _UNSET)
    if cached is not _UNSET:
        return cached
    from starlette.routing import Match, Route

    found = None
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            found = route if isinstance(route, Route) else None
            break
    scope[_ROUTE_KEY] = found
    return found


class RequestDetails:
    """What the processor reported for one HTTP request (possibly several prompts)."""

    def __init__(self) -> None:
        self.method: str | None = None
        self.ratios: dict[str, float | str] = {}
        self.items: list[tuple[str, int, int, str]] = []  # (modality, tokens, kept, why)
        self.cap: int | None = None
        self.routing: dict[str, list[tuple[int, int]]] = {}  # modality -> (through, layers)

    def add(self, method: str, items: Iterable[tuple[Any, ...]],
            ratios: dict[str, float | str], cap: int | None = None) -> None:
        """``items``: (modality, method, tokens, kept[, why]) per media item."""
        self.method = self.method or method
        self.ratios.update(ratios)
        self.cap = self.cap if cap is None else cap
        self.items.extend((it[0], it[2], it[3], it[4] if len(it) > 4 else "ratio")
                          for it in items)

    def add_routing(self, items: Iterable[tuple[str, str, int, int]], layers: int) -> None:
        """Layer-wise routed items, in prompt order: (modality, method, tokens, through)."""
        for modality, _m, _tokens, through in items:
            self.routing.setdefault(modality, []).append((through, layers))

    def to_json(self) -> dict[str, Any] | None:
        if not self.items:
            return None
        seen: dict[str, int] = {}
        items = []
        routing = {m: list(v) for m, v in self.routing.items()}
        skipped = 0
        for modality, tokens, kept, why in self.items:
            index = seen.get(modality, 0)
            seen[modality] = index + 1
            item: dict[str, Any] = {"modality": modality, "index": index, "tokens": tokens,
                                    "kept": kept, "why": why}
            if routing.get(modality):
                through, layers = routing[modality].pop(0)
                item.update(routed_per_layer=through, routed_layers=layers)
                skipped += (tokens - through) * layers
            items.append(item)
        out: dict[str, Any] = {
            "method": self.method,
            "ratios": dict(self.ratios),
            "tokens": sum(it[1] for it in self.items),
            "kept": sum(it[2] for it in self.items),
            "items": items,
        }
        if self.cap is not None:
            out["max_visual_tokens"] = self.cap
        if self.routing:
            out["skipped_token_layers"] = skipped
        return out


_current: contextvars.ContextVar[RequestDetails | None] = contextvars.ContextVar(
    "tokenprune_request_details", default=None
)


def note_request(method: str, items: Iterable[tuple[Any, ...]],
                 ratios: dict[str, float | str], cap: int | None = None) -> None:
    """Called by the processor for each prompt it preprocessed: ``items`` are
    (modality, method, tokens, kept[, why]) per media item. No-op outside a request."""
    details = _current.get()
    if details is not None:
        details.add(method, items, ratios, cap)


def note_routing(items: Iterable[tuple[str, str, int, int]], layers: int) -> None:
    """A prompt's layer-wise routed items (see :meth:`RequestDetails.add_routing`). No-op
    outside a request."""
    details = _current.get()
    if details is not None:
        details.add_routing(items, layers)


def note_plans(method: str, plans: Sequence[ItemPlan], ratios: dict[str, float | str],
               cap: int | None = None) -> None:
    """Called by the processor for each prompt it preprocessed: its items' plans (in prompt
    order per modality), the method it asked for, the ratio per modality and the request's cap.
    No-op outside a request."""
    note_request(method, [(p.modality, p.method, p.num_tokens, p.kept, p.why) for p in plans],
                 ratios, cap)
    routed = [p for p in plans if p.layers]
    for layers in sorted({p.layers for p in routed}):
        note_routing([(p.modality, p.method, p.num_tokens, p.num_keep)
                      for p in routed if p.layers == layers], layers)


# --------------------------------------------------------------------------- context


#: Renderer attributes holding the thread pools its ``make_async`` wrappers submit to.
RENDERER_EXECUTORS = ("_mm_executor", "_executor")


def propagate_context(renderer: Any) -> bool:
    """Make work the renderer runs in its thread pools run inside a copy of the submitter's
    context (what ``asyncio.to_thread`` does; ``loop.run_in_executor`` does not).

    vLLM internal touched: the renderer's executors (``BaseRenderer._mm_executor``, where
    multimodal preprocessing runs, and ``_executor``). Their ``make_async`` wrappers captured
    the executor objects when the renderer was built, so each object's ``submit`` is wrapped in
    place: ``submit(fn, *args)`` becomes ``submit(copy_context().run, fn, *args)``. asyncio's
    ``run_in_executor`` calls ``submit`` in the awaiting task, so the copy is that request's
    context. Returns False (the field is then not sent) when no executor is found.
    """
    found = False
    for name in RENDERER_EXECUTORS:
        executor = getattr(renderer, name, None)
        submit = getattr(executor, "submit", None)
        if submit is None:
            continue
        found = True
        if getattr(executor, "_tp_context_submit", False):
            continue

        def submit_in_context(fn: Any, /, *args: Any, _submit: Any = submit,
                              **kwargs: Any) -> Any:
            return _submit(contextvars.copy_context().run, fn, *args, **kwargs)

        executor.submit = submit_in_context
        executor._tp_context_submit = True
    return found


# --------------------------------------------------------------------------- middleware


def add_field(payload: bytes, details: dict[str, Any], *, stream_chunk: bool) -> bytes | None:
    """``payload`` (a response object's JSON) with the field added next to its ``usage``, or
    None when it is not the object that gets it (no usage; a streamed content chunk)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not obj.get("usage"):
        return None
    if stream_chunk and obj.get("choices"):
        return None  # continuous usage stats: only the final usage chunk gets the field
    obj[FIELD] = details
    return json.dumps(obj, separators=(",", ":")).encode()


class PruneDetailsMiddleware:
    """ASGI middleware that adds :data:`FIELD` to chat/completions responses."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._propagating: bool | None = None

    def _enabled(self, scope: dict[str, Any]) -> bool:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return False
        state = getattr(scope.get("app"), "state", None)
        bridge = getattr(state, _BRIDGE_STATE_KEY, None)
        if bridge is None or getattr(bridge, "config", None) is None:
            return False
        if getattr(matched_route(scope), "path", None) not in DETAIL_PATHS:
            return False
        if self._propagating is None:
            engine = getattr(state, "engine_client", None)
            renderer = getattr(engine, "renderer", None)
            self._propagating = renderer is not None and propagate_context(renderer)
            if not self._propagating:
                logger.warning("vllm-tokenprune: this vLLM's renderer has an unexpected shape; "
                               "responses will not carry the %r field", FIELD)
        return self._propagating

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self._enabled(scope):
            await self.app(scope, receive, send)
            return
        details = RequestDetails()
        token = _current.set(details)
        try:
            await self.app(scope, receive, _Sender(send, details))
        finally:
            _current.reset(token)


class _Sender:
    """Wraps ``send``: rewrites the JSON body, or the usage chunk of an event stream."""

    def __init__(self, send: Any, details: RequestDetails) -> None:
        self.send = send
        self.details = details
        self.mode = "pass"  # "json" | "sse" | "pass"
        self.field: dict[str, Any] | None = None
        self.start: dict[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._on_start(message)
            if self.mode != "json":
                await self.send(message)
            return
        if kind != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        if self.mode == "sse":
            await self.send(self._sse(message))
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.chunks)
        assert self.start is not None and self.field is not None
        new = add_field(body, self.field, stream_chunk=False)
        start = self.start
        if new is not None:
            body = new
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            start = dict(start, headers=headers)
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _on_start(self, message: dict[str, Any]) -> None:
        # The prompt was preprocessed before the route answered: the details are complete.
        self.field = self.details.to_json()
        if message.get("status") != 200:
            return
        content_type = b""
        for k, v in message.get("headers", []):
            if k.lower() == b"content-type":
                content_type = v.lower()
        if content_type.startswith(b"application/json") and self.field is not None:
            self.mode = "json"
            self.start = message
        elif content_type.startswith(b"text/event-stream"):
            self.mode = "sse"

    def _sse(self, message: dict[str, Any]) -> dict[str, Any]:
        """vLLM sends one ``data: {...}\\n\\n`` event per body message; the final usage chunk
        is the one with ``usage`` and ``choices: []``. Others pass through untouched."""
        body: bytes = message.get("body", b"")
        if b'"usage"' not in body:
            return message
        self.field = self.details.to_json()
        if self.field is None:
            return message
        events = body.split(b"\n\n")
        changed = False
        for i, event in enumerate(events):
            if not event.startswith(b"data: {"):
                continue
            new = add_field(event[len(b"data: "):], self.field, stream_chunk=True)
            if new is not None:
                events[i] = b"data: " + new
                changed = True
        if not changed:
            return message
        self.mode = "pass"  # one usage chunk per stream
        return dict(message, body=b"\n\n".join(events))
