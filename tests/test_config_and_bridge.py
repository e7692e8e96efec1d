"""Unit tests of the config schema and of the request-field bridge (no server needed)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from vllm_tokenprune.config import (
    RequestFieldError,
    TokenPruneConfig,
    TokenPruneConfigError,
    parse_config,
    parse_request_fields,
)
from vllm_tokenprune.serving.bridge import _BridgeState, rewrite_body
from vllm_tokenprune.serving.seal import SEAL_KEY, check_sealed_kwargs, seal


def test_defaults_and_valid_block():
    cfg = parse_config({"method": "svd_prune", "prune_ratio": 0.889, "min_keep": 4,
                        "allowed_methods": ["svd_prune", "lrcp"],
                        "options": {"lrcp": {"rank": 8}}})
    assert cfg.method == "svd_prune" and cfg.min_keep == 4
    assert cfg.ratio_for("video") == pytest.approx(0.889)
    assert parse_config(None) == TokenPruneConfig()


@pytest.mark.parametrize("block,needle", [
    ({"method": "nope"}, "token_prune.method: unknown method 'nope'"),
    ({"prune_ratio": 1.0}, "token_prune.prune_ratio: must be in [0, 1)"),
    ({"prune_ratio": -0.5}, "token_prune.prune_ratio"),
    ({"video_prune_ratio": 2}, "token_prune.video_prune_ratio"),
    ({"min_keep": 0}, "token_prune.min_keep"),
    ({"bogus": 1}, "token_prune.bogus: unknown key"),
    ({"allowed_methods": ["lrcp"], "method": "norm"}, "not in allowed_methods"),
    ({"options": {"lrcp": {"no_such_option": 1}}}, "no_such_option"),
    ({"options": {"zzz": {}}}, "unknown method 'zzz'"),
])
def test_bad_blocks_name_the_key(block, needle):
    with pytest.raises(TokenPruneConfigError) as e:
        parse_config(block)
    assert needle in str(e.value)


def test_block_must_be_object():
    with pytest.raises(TokenPruneConfigError, match="JSON object"):
        parse_config([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 1.0, -0.1, "abc", True, False, None, math.nan, math.inf,
                                   [0.5], {"x": 1}])
def test_bad_ratios(value):
    with pytest.raises(RequestFieldError) as e:
        parse_request_fields({"prune_ratio": value}, TokenPruneConfig())
    assert e.value.field == "prune_ratio"


def test_good_fields_and_allowed_methods():
    cfg = TokenPruneConfig(allowed_methods=("lrcp", "norm"))
    out = parse_request_fields({"prune_ratio": 0, "prune_method": "norm",
                                "video_prune_ratio": 0.5}, cfg)
    assert out == {"prune_ratio": 0.0, "prune_method": "norm", "video_prune_ratio": 0.5}
    with pytest.raises(RequestFieldError, match="not allowed"):
        parse_request_fields({"prune_method": "svd_prune"}, cfg)


def _state(config=TokenPruneConfig(), trust=False):  # noqa: B008
    return _BridgeState(config, trust, ["TokenPruneQwen2_5_VLForConditionalGeneration"])


def test_bridge_moves_fields_into_mm_processor_kwargs():
    body = json.dumps({"model": "m", "messages": [], "prune_ratio": 0.75,
                       "prune_method": "lrcp"}).encode()
    new, err = rewrite_body(body, "/v1/chat/completions", _state())
    assert err is None
    data = json.loads(new)
    assert "prune_ratio" not in data
    kw = data["mm_processor_kwargs"]
    assert kw.pop(SEAL_KEY) == seal({"prune_ratio": 0.75, "prune_method": "lrcp"})
    assert kw == {"prune_ratio": 0.75, "prune_method": "lrcp"}


def test_bridge_passes_unrelated_bodies_untouched():
    body = json.dumps({"model": "m", "messages": []}).encode()
    assert rewrite_body(body, "/v1/chat/completions", _state()) == (None, None)
    assert rewrite_body(b"not json prune_ratio", "/v1/chat/completions", _state()) == (None, None)


def test_bridge_errors():
    body = json.dumps({"prune_ratio": "x"}).encode()
    _, (status, payload) = rewrite_body(body, "/v1/chat/completions", _state())
    assert status == 400 and json.loads(payload)["error"]["param"] == "prune_ratio"
    # model without a TokenPrune architecture
    _, (status, payload) = rewrite_body(body, "/v1/chat/completions", _state(config=None))
    assert status == 400 and "TokenPrune" in json.loads(payload)["error"]["message"]
    # untrusted client mm_processor_kwargs keep vLLM's rule, trusted ones are merged
    body = json.dumps({"mm_processor_kwargs": {"max_pixels": 1}, "prune_ratio": 0.5}).encode()
    _, (status, payload) = rewrite_body(body, "/v1/chat/completions", _state())
    assert status == 400 and json.loads(payload)["error"]["param"] == "mm_processor_kwargs"
    new, err = rewrite_body(body, "/v1/chat/completions", _state(trust=True))
    assert err is None
    kw = json.loads(new)["mm_processor_kwargs"]
    assert kw == {"max_pixels": 1, "prune_ratio": 0.5, SEAL_KEY: seal({"prune_ratio": 0.5})}
    # fields on routes that cannot carry them
    body = json.dumps({"prune_ratio": 0.5}).encode()
    _, (status, _) = rewrite_body(body, "/v1/embeddings", _state())
    assert status == 400


# -- hardening: the bridge sees what vLLM's JSON parser sees


def _err(body: bytes, path: str = "/v1/chat/completions", **state):
    new, err = rewrite_body(body, path, _state(**state))
    assert err is not None, new
    status, payload = err
    assert status == 400
    return json.loads(payload)["error"]


def test_escaped_keys_are_seen_as_vllm_sees_them():
    # "prune\u005fratio" is prune_ratio once decoded: moved and sealed like the plain spelling
    body = b'{"model": "m", "messages": [], "prune\\u005fratio": 0.75}'
    new, err = rewrite_body(body, "/v1/chat/completions", _state())
    assert err is None
    assert json.loads(new)["mm_processor_kwargs"]["prune_ratio"] == 0.75
    assert _err(b'{"prune\\u005fratio": 7}')["param"] == "prune_ratio"
    # escaped mm_processor_kwargs / media_io_kwargs keep vLLM's untrusted rule
    for key in ("mm_processor_kwarg\\u0073", "media_io_kwarg\\u0073"):
        body = b'{"model": "m", "' + key.encode() + b'": {"max_pixels": 1}}'
        assert _err(body)["param"] == key.replace("\\u0073", "s")


@pytest.mark.parametrize("key", ["prune_ratio", "prune_method", "video_prune_ratio",
                                 "mm_processor_kwargs", "media_io_kwargs", "extra_body"])
def test_duplicated_guarded_keys_are_refused(key):
    body = f'{{"{key}": 0.5, "prune\\u005fratio": 0.5, "{key}": 0.25}}'.encode()
    assert _err(body)["param"] == key


def test_nested_and_inner_pruning_fields_are_refused():
    err = _err(json.dumps({"extra_body": {"prune_ratio": 0.5}}).encode())
    assert err["param"] == "extra_body.prune_ratio"
    for trust in (False, True):
        err = _err(json.dumps({"mm_processor_kwargs": {"prune_ratio": 0.5}}).encode(),
                   trust=trust)
        assert err["param"] == "mm_processor_kwargs.prune_ratio"
        err = _err(json.dumps({"mm_processor_kwargs": {SEAL_KEY: "x"}}).encode(), trust=trust)
        assert err["param"] == f"mm_processor_kwargs.{SEAL_KEY}"
    # elsewhere a nested key named like a field is not a request field: untouched
    body = json.dumps({"metadata": {"prune_ratio": "x"}, "messages": []}).encode()
    assert rewrite_body(body, "/v1/chat/completions", _state()) == (None, None)


def test_every_route_is_parsed():
    for path in ("/v1/responses", "/tokenize", "/invocations", "/v1/messages", "/pooling"):
        err = _err(b'{"prune\\u005fratio": 0.5}', path=path)
        assert err["param"] == "prune_ratio" and path in err["message"]
        err = _err(b'{"mm_processor_kwarg\\u0073": {"fps": 99}}', path=path)
        assert err["param"] == "mm_processor_kwargs"


def test_seal_check_exempts_only_sealed_keys():
    from vllm.exceptions import VLLMValidationError

    body = json.dumps({"prune_ratio": 0.5, "prune_method": "norm"}).encode()
    new, _ = rewrite_body(body, "/v1/chat/completions", _state())
    kw = json.loads(new)["mm_processor_kwargs"]
    assert check_sealed_kwargs(kw) is None  # nothing left for vLLM's own rule
    assert SEAL_KEY not in kw and kw == {"prune_ratio": 0.5, "prune_method": "norm"}
    assert check_sealed_kwargs(kw) is None  # a second render of the same request passes
    # trusted client kwargs are left for vLLM's rule
    body = json.dumps({"mm_processor_kwargs": {"fps": 1}, "prune_ratio": 0.5}).encode()
    new, _ = rewrite_body(body, "/v1/chat/completions", _state(trust=True))
    assert check_sealed_kwargs(json.loads(new)["mm_processor_kwargs"]) == {"fps": 1}
    # unsealed, forged, or tampered values are refused
    for kw in ({"prune_ratio": 0.5},
               {"prune_ratio": 0.5, SEAL_KEY: "0" * 64},
               {"prune_ratio": 0.25, SEAL_KEY: seal({"prune_ratio": 0.5})},
               {"prune_ratio": 0.5, "prune_method": "norm", SEAL_KEY: seal({"prune_ratio": 0.5})},
               {SEAL_KEY: 3}):
        with pytest.raises(VLLMValidationError) as exc:
            check_sealed_kwargs(dict(kw))
        assert "mm_processor_kwargs." in exc.value.parameter
    # no pruning keys: vLLM's rule judges the kwargs unchanged
    assert check_sealed_kwargs({"fps": 2}) == {"fps": 2}
    assert check_sealed_kwargs(None) is None


def test_guard_wraps_vllms_check_and_keeps_its_rule():
    from vllm.entrypoints.generate.base.protocol import validate_request_mm_kwargs as original
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    from vllm_tokenprune.serving.seal import install_request_guard

    install_request_guard()
    install_request_guard()  # idempotent
    guarded = online_renderer.validate_request_mm_kwargs
    assert guarded.__wrapped__ is original
    kw = {"prune_ratio": 0.5, SEAL_KEY: seal({"prune_ratio": 0.5})}
    guarded(mm_processor_kwargs=kw, media_io_kwargs=None, trust_request_mm_kwargs=False)
    kw = {"prune_ratio": 0.5, "max_pixels": 9, SEAL_KEY: seal({"prune_ratio": 0.5})}
    with pytest.raises(VLLMValidationError) as exc:
        guarded(mm_processor_kwargs=kw, media_io_kwargs=None, trust_request_mm_kwargs=False)
    assert exc.value.parameter == "mm_processor_kwargs"


# -- the bridge inside vLLM's real app (build_app: its routes, --api-key, --root-path), no engine

KEY = "unit-key"


@pytest.fixture(scope="module")
def vllm_app() -> Any:
    """vLLM's FastAPI app as ``vllm serve --api-key unit-key --root-path /api`` builds it, with
    the plugin attached and its bridge state set (no engine: only answers given before a route
    handler runs are observable)."""
    import os

    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    saved = os.environ.get("VLLM_PLUGINS")
    os.environ["VLLM_PLUGINS"] = "tokenprune"
    try:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            ["--model", "m", "--api-key", KEY, "--root-path", "/api"])
        app = build_app(args, supported_tasks=("generate",))
    finally:
        if saved is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = saved
    app.state.tokenprune = _state()
    return app


def _asgi_post(app: Any, path: str, body: bytes, *, key: bool = True, ctype: str | None =
               "application/json", method: str = "POST") -> tuple[int, dict[str, Any], int]:
    """One request through the ASGI app: (status, JSON answer, how many times anyone asked for
    the request body)."""
    import asyncio

    headers = [] if ctype is None else [(b"content-type", ctype.encode())]
    if key:
        headers.append((b"authorization", f"Bearer {KEY}".encode()))
    headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": headers,
             "server": ("t", 80), "client": ("c", 1)}
    reads = 0
    out: dict[str, Any] = {"body": b""}
    half = len(body) // 2

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads == 1:
            return {"type": "http.request", "body": body[:half], "more_body": True}
        if reads == 2:
            return {"type": "http.request", "body": body[half:], "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    try:
        answer = json.loads(out["body"] or b"{}")
    except ValueError:
        answer = {"raw": out["body"][:200]}
    return out["status"], answer, reads


def _param(answer: dict[str, Any]) -> Any:
    return (answer.get("error") or {}).get("param") if isinstance(answer.get("error"), dict) \
        else None


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The route paths the bridge looked at a body for."""
    from vllm_tokenprune.serving import bridge as serving

    seen: list[str] = []
    original = serving.rewrite_body

    def spy(body: bytes, path: str, state: Any) -> Any:
        seen.append(path)
        return original(body, path, state)

    monkeypatch.setattr(serving, "rewrite_body", spy)
    return seen


BIG = ("[" + ",".join(["{}"] * 500_000) + "]").encode()  # 1.5 MB of objects


def test_no_work_on_unknown_paths_methods_and_unauthenticated_requests(vllm_app, parses):
    ratio = b'{"prune_ratio": 7, "x": ' + BIG + b"}"
    for path, key, status in (("/nope", False, 404), ("/nope", True, 404),
                              ("/api/nope", True, 404), ("/apix/v1/chat/completions", True, 404),
                              ("/v1/chat/completions", False, 401),
                              ("/api/v1/chat/completions", False, 401),
                              ("/api/v1/completions", False, 401),
                              ("/v1/models", True, 405)):  # a GET-only route
        got, _, reads = _asgi_post(vllm_app, path, ratio, key=key)
        assert (got, reads) == (status, 0), (path, key, got, reads)
    assert parses == []


def test_bodies_vllm_does_not_parse_as_json_are_not_read(vllm_app, parses):
    body = b'{"prune_ratio": 7}'
    # vLLM's validate_json_request refuses these before using the body
    for ctype in ("text/plain", "application/json-patch+json", None, "multipart/form-data; b=x"):
        status, answer, _ = _asgi_post(vllm_app, "/api/v1/chat/completions", body, ctype=ctype)
        assert status == 400 and _param(answer) != "prune_ratio", (ctype, answer)
    # a route that takes no body: the scale-out route this server disabled (403, unread)
    status, answer, reads = _asgi_post(vllm_app, "/api/inference/v1/generate", body)
    assert (status, reads) == (403, 0), answer
    assert parses == []


def test_root_path_routes_as_vllm_routes(vllm_app, parses):
    huge = b'{"model": "m", "messages": [], "prune_ratio": 1' + b"0" * 400 + b"}"
    for path in ("/api/v1/chat/completions", "/v1/chat/completions", "/api/v1/completions"):
        status, answer, reads = _asgi_post(vllm_app, path, huge)
        assert status == 400 and _param(answer) == "prune_ratio", (path, answer)
        assert "must be a number in [0, 1)" in answer["error"]["message"]
        assert len(answer["error"]["message"]) < 200
    # unguarded by --api-key (vLLM guards /v1, /v2, /inference, /cohere only): still the route
    status, answer, _ = _asgi_post(vllm_app, "/api/tokenize", b'{"prune\\u005fratio": 0.5}',
                                   key=False)
    assert status == 400 and _param(answer) == "prune_ratio"
    assert "not supported on /tokenize" in answer["error"]["message"]
    assert parses == ["/v1/chat/completions"] * 2 + ["/v1/completions", "/tokenize"]


def test_bridge_checks_the_key_itself_if_it_ever_runs_first():
    """If a vLLM version put the bridge outside its AuthenticationMiddleware, the bridge applies
    vLLM's own check before reading (here: an app built with the order inverted)."""
    from fastapi import FastAPI
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from vllm_tokenprune.serving.bridge import TokenPruneMiddleware, _auth_verifier

    app = FastAPI(root_path="/api")

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        return body

    app.add_middleware(AuthenticationMiddleware, tokens=[KEY])
    assert _auth_verifier(app) is None  # no bridge in the stack: nothing of ours to order
    app.add_middleware(TokenPruneMiddleware)  # outermost
    assert _auth_verifier(app) is not None
    app.state.tokenprune = _state()
    bad = b'{"prune_ratio": 7}'
    assert _asgi_post(app, "/api/v1/chat/completions", bad, key=False)[::2] == (401, 0)
    status, answer, _ = _asgi_post(app, "/api/v1/chat/completions", bad)
    assert status == 400 and _param(answer) == "prune_ratio"


def test_real_app_orders_vllms_key_check_first(vllm_app):
    from vllm_tokenprune.serving.bridge import _auth_verifier

    assert _auth_verifier(vllm_app) is None


def test_byte_scan_catches_every_spelling():
    from vllm_tokenprune.serving.reading import GUARDED_KEYS, maybe_guarded

    for key in GUARDED_KEYS:
        assert maybe_guarded(json.dumps({key: 1}).encode())
        esc = key[:2] + f"\\u{ord(key[2]):04x}" + key[3:]
        assert maybe_guarded(b'{"' + esc.encode() + b'": 1}')
        assert maybe_guarded(json.dumps({key: 1}).encode("utf-16"))
    assert not maybe_guarded(json.dumps({"model": "m", "max_tokens": 3,
                                         "messages": [{"content": "a\nb"}]}).encode())
    # past the anchors it visits one by one, the scan searches the rest of the body
    many = "a_b\n" * 3000
    for tail in ('"prune_ratio": 1', '"x": "\\u0041"', '"extra_body": {}',
                 '"media_io_kwargs": {}'):
        body = json.dumps({"text": many})[:-1] + ", " + tail + "}"
        assert maybe_guarded(body.encode()), tail
    assert not maybe_guarded(json.dumps({"text": many}).encode())
