"""Which request bodies the request bridge reads, and how it parses them (runs in the API
server).

The reading rule: only the body of a ``POST`` that vLLM's own app routes to a route whose body
it parses as JSON (Starlette's matching, so the root path is removed exactly as vLLM removes it,
:func:`json_route`), with the media type vLLM accepts there, and only after vLLM's
``--api-key`` check (:class:`vllm_tokenprune.serving.bridge._AuthCheck`). Everything else
(unknown paths, wrong methods, unauthenticated requests, multipart uploads, routes that take no
body) goes through unread, so the bridge reads no byte vLLM would not read itself. Before any
parse it scans the bytes for the guarded keys (:func:`maybe_guarded`: every plain spelling
contains ``prune_``, ``_kwargs``, ``extra_body`` or ``_visual_tokens``; any ``\\u`` escape or a
UTF-16/32 body counts
as a maybe); then it parses with the parser vLLM uses (:func:`load`, :func:`json.loads`, so an
escaped key is the key vLLM sees), and only when a guarded key is present at the top level does
it check for duplicates (a second, C-speed parse, :func:`duplicated`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from vllm_tokenprune.config import REQUEST_FIELDS, OversizedInteger
from vllm_tokenprune.response import matched_route

UNTRUSTED_KWARGS = ("mm_processor_kwargs", "media_io_kwargs")
#: Top-level keys that may not appear twice in a body (JSON's last-wins would hide one).
GUARDED_KEYS = (*REQUEST_FIELDS, *UNTRUSTED_KWARGS, "extra_body")


#: Byte strings one of which every spelling of a guarded key without a JSON escape contains
#: (the four pruning fields, the two kwargs, ``extra_body``): a body without any of them and
#: without a ``\\u`` escape cannot carry a guarded key, so it is handed on unparsed. Each holds
#: an underscore, the anchor the scan looks for first.
_KEY_MARKS = (b"prune_", b"_kwargs", b"extra_body", b"_visual_tokens")
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


def load(body: bytes) -> tuple[Any, bool]:
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


def duplicated(body: bytes, present: list[str], oversized: bool = False) -> str | None:
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
