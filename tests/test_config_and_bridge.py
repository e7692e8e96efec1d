"""Unit tests of the config schema and of the request-field bridge (no server needed)."""

from __future__ import annotations

import json
import math

import pytest

from vllm_tokenprune.config import (
    RequestFieldError,
    TokenPruneConfig,
    TokenPruneConfigError,
    parse_config,
    parse_request_fields,
)
from vllm_tokenprune.serving import _BridgeState, rewrite_body


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
    assert data["mm_processor_kwargs"] == {"prune_ratio": 0.75, "prune_method": "lrcp"}


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
    assert json.loads(new)["mm_processor_kwargs"] == {"max_pixels": 1, "prune_ratio": 0.5}
    # fields on routes that cannot carry them
    body = json.dumps({"prune_ratio": 0.5}).encode()
    _, (status, _) = rewrite_body(body, "/v1/embeddings", _state())
    assert status == 400
