"""Property tests (hypothesis) of the request fields, the bridge and the ``token_prune`` block.

The oracle here is the documented rule, written independently of the code under test:

* ``prune_ratio`` / ``video_prune_ratio``: a JSON number (not ``true``/``false``), finite, in
  [0, 1), or the string ``"auto"``; ``-0.0`` means 0;
* ``max_visual_tokens``: a JSON integer (not ``true``, not ``2.0``) in [1, 2^31 - 1];
* ``prune_method``: a JSON string naming a registered method the server allows;
* the first bad field, in the order prune_ratio, video_prune_ratio, max_visual_tokens,
  prune_method, is named.

``field_values`` and ``expected_outcome`` are shared with the server sample in
``tests/test_hardening_server.py``.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenprune.config import (
    REQUEST_FIELDS,
    OversizedInteger,
    RequestFieldError,
    TokenPruneConfig,
    TokenPruneConfigError,
    parse_config,
    parse_request_fields,
)
from vllm_tokenprune.scoring import list_methods, num_kept
from vllm_tokenprune.serving.bridge import _BridgeState, rewrite_body
from vllm_tokenprune.serving.seal import SEAL_KEY, check_sealed_kwargs

RATIO_FIELDS = ("prune_ratio", "video_prune_ratio")

#: JSON texts of values, edge cases first: every JSON number form (sign, fraction, exponent
#: with and without sign, either case), Python's non-standard NaN/Infinity, and numbers past
#: float range: integers of 400 digits (past about 309, ``float()`` raises OverflowError) and of
#: 5000 digits (past ``sys.get_int_max_str_digits()``, ``int()`` itself refuses them).
_EDGE_NUMBERS = ["0", "-0", "-0.0", "0.0", "1", "1.0", "0.999999999999", "0.9999999999999999999",
                 "1e309", "-1e309", "1e400", "-1e400", "1E+400", "1e-320", "5e-324", "1e-400",
                 "-1e-400", "0e0", "-0E-0", "0.5E+0", "NaN", "Infinity", "-Infinity",
                 "100000000000000000000000000000000000000000", "-1", "0.5e0", "5E-1",
                 "1" + "0" * 400, "-1" + "0" * 400, "0" + "." + "0" * 400 + "1",
                 "0." + "9" * 400, "1" + "0" * 400 + ".0", "1" + "0" * 5000, "-" + "9" * 5000,
                 "0." + "5" * 5000 + "e-3", "123456789e-999999", "1e999999"]

#: Integers up to this many digits in the random draws (float range ends near 309 digits).
_BIG = 10 ** 450


def _json_value() -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.sampled_from(_EDGE_NUMBERS),
        st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
        st.floats(min_value=0.0, max_value=1.0).map(json.dumps),
        st.integers(min_value=-10**40, max_value=10**40).map(str),
        st.integers(min_value=-_BIG, max_value=_BIG).map(str),
        st.integers(300, 6000).map(lambda n: "1" + "0" * n),
        st.sampled_from(["true", "false", "null", '""', '"0.5"', '"lrcp"', '"LRCP"', '" lrcp"',
                         '"norm\\u0000"', '"__import__"', '"../etc/passwd"', '"n\\u006frm"',
                         '"auto"', '"AUTO"', '"automatic"', '"a\\u0075to"', "2147483647",
                         "2147483648", "1.5", "2.0", '"many"']),
        st.sampled_from(list_methods()).map(json.dumps),
        st.text(max_size=12).map(json.dumps),
    )
    return st.one_of(scalar, scalar.map(lambda t: f"[{t}]"),
                     scalar.map(lambda t: f'{{"value": {t}}}'))


def _spelling(name: str) -> st.SearchStrategy[str]:
    """The key as written in the body: plain, or with one character as a \\u escape."""
    def esc(i: int) -> str:
        return name[:i] + f"\\u{ord(name[i]):04x}" + name[i + 1:]
    return st.one_of(st.just(name), st.integers(0, len(name) - 1).map(esc))


@st.composite
def field_values(draw: Any) -> dict[str, str]:
    """A set of pruning fields as {raw JSON key: raw JSON value text}, each field at most once."""
    out = {}
    for name in REQUEST_FIELDS:
        if draw(st.booleans()):
            out[draw(_spelling(name))] = draw(_json_value())
    return out


def _parse_int(text: str) -> int | OversizedInteger:
    """What the bridge hands over for an integer literal Python's ``int`` refuses."""
    digits = len(text.lstrip("-"))
    return OversizedInteger(digits) if digits > sys.get_int_max_str_digits() else int(text)


def _decode(fields: dict[str, str]) -> dict[str, Any]:
    return {json.loads(f'"{k}"'): json.loads(v, parse_int=_parse_int) for k, v in fields.items()}


def _ratio_ok(v: Any) -> bool:
    if v == "auto" and type(v) is str:
        return True
    if type(v) is int:  # any length: compared as an integer, never as a float
        return v == 0
    return type(v) is float and math.isfinite(v) and 0 <= v < 1


def expected_outcome(fields: dict[str, str], allowed: tuple[str, ...] | None = None,
                     floor: int = 0) -> str | dict[str, Any]:
    """The documented outcome: the name of the refused field, or the accepted values.
    ``floor``: the least the request's media items keep in all (``min_keep`` x items): a
    ``max_visual_tokens`` below it is refused, after every field's own check."""
    values = _decode(fields)
    for name in RATIO_FIELDS:
        if name in values and not _ratio_ok(values[name]):
            return name
    cap = values.get("max_visual_tokens")
    if "max_visual_tokens" in values and not (type(cap) is int and 1 <= cap < 2**31):
        return "max_visual_tokens"
    method = values.get("prune_method")
    if "prune_method" in values and not (
            type(method) is str and method in list_methods()
            and (allowed is None or method in allowed)):
        return "prune_method"
    if "max_visual_tokens" in values and values["max_visual_tokens"] < floor:
        return "max_visual_tokens"
    return {k: (float(v) + 0.0 if k in RATIO_FIELDS and v != "auto" else v)
            for k, v in values.items()}


@settings(max_examples=400, deadline=None)
@given(field_values(), st.sampled_from([None, ("lrcp", "norm")]))
def test_parse_request_fields_follows_the_documented_rule(fields, allowed):
    cfg = TokenPruneConfig(allowed_methods=allowed)
    outcome = expected_outcome(fields, allowed)
    try:
        got = parse_request_fields(_decode(fields), cfg)
    except RequestFieldError as e:
        assert outcome == e.field, (fields, str(e))
        assert str(e).startswith(e.field + ":")
        assert len(str(e)) < 400, str(e)  # a client's megabyte value is never echoed
        return
    assert got == outcome
    for k in RATIO_FIELDS:
        if k in got and got[k] != "auto":
            assert type(got[k]) is float and math.copysign(1, got[k]) == 1


@settings(max_examples=300, deadline=None)
@given(field_values(), st.booleans())
def test_bridge_follows_the_documented_rule(fields, trust):
    state = _BridgeState(TokenPruneConfig(), trust, ["TokenPruneX"])
    text = '{"model": "m", "messages": []' + "".join(
        f', "{k}": {v}' for k, v in fields.items()) + "}"
    new, err = rewrite_body(text.encode(), "/v1/chat/completions", state)
    outcome = expected_outcome(fields)
    if isinstance(outcome, str):
        assert err is not None and err[0] == 400, (fields, new)
        assert json.loads(err[1])["error"]["param"] == outcome
        return
    assert err is None
    if not outcome:
        assert new is None
        return
    data = json.loads(new)
    assert not set(REQUEST_FIELDS) & set(data)
    kw = data["mm_processor_kwargs"]
    assert SEAL_KEY in kw
    assert check_sealed_kwargs(kw) is None  # the seal verifies; nothing left for vLLM's rule
    assert kw == outcome


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
       st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/x"]))
def test_bodies_without_guarded_keys_pass_untouched(body, path):
    body = {k: v for k, v in body.items()
            if k not in (*REQUEST_FIELDS, "mm_processor_kwargs", "media_io_kwargs", "extra_body")}
    state = _BridgeState(TokenPruneConfig(), False, ["TokenPruneX"])
    assert rewrite_body(json.dumps(body).encode(), path, state) == (None, None)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.floats(0, 1, exclude_max=True), st.integers(0, 10**6),
       st.floats(0, 1, exclude_max=True))
def test_num_kept_properties(n, ratio, min_keep, other):
    k = num_kept(n, ratio, min_keep)
    assert 0 <= k <= n
    assert k >= min(n, min_keep)
    lo, hi = sorted((ratio, other))
    assert num_kept(n, hi, min_keep) <= num_kept(n, lo, min_keep)  # more pruning, fewer kept
    assert num_kept(n, 0.0, min_keep) == n


# -- the token_prune start-up block

_BLOCK_KEYS = ["method", "prune_ratio", "video_prune_ratio", "min_keep", "allowed_methods",
               "options", "max_greedy_keep", "ratio", "Method", "prune\u005fratio"]


def _block_value() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-10**20, 10**20),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
        st.sampled_from(list_methods()), st.floats(0, 1, exclude_max=True),
    )
    return st.one_of(leaf, st.lists(st.one_of(leaf, st.sampled_from(list_methods())),
                                    max_size=3),
                     st.dictionaries(st.sampled_from([*list_methods(), "zz"]),
                                     st.dictionaries(st.text(max_size=6), leaf, max_size=2),
                                     max_size=2))


def _block_ok(block: dict[str, Any]) -> bool | None:
    """The documented rule for the keys whose rule is simple; None: options decide."""
    known = {"method", "prune_ratio", "video_prune_ratio", "min_keep", "allowed_methods",
             "options", "max_greedy_keep"}
    if set(block) - known:
        return False
    method = block.get("method", "lrcp")
    if type(method) is not str or method not in list_methods():
        return False
    for k in RATIO_FIELDS:
        if k in block and not (block[k] is None and k == "video_prune_ratio") \
                and not _ratio_ok(block[k]):
            return False
    for k in ("min_keep", "max_greedy_keep"):
        if k in block and not (type(block[k]) is int and block[k] >= 1):
            return False
    allowed = block.get("allowed_methods")
    if allowed is not None and not (
            isinstance(allowed, list) and all(type(m) is str and m in list_methods()
                                              for m in allowed) and method in allowed):
        return False
    opts = block.get("options", {})
    if not isinstance(opts, dict):
        return False
    if any(m not in list_methods() or not isinstance(o, dict) for m, o in opts.items()):
        return False
    return True if not any(opts.values()) else None


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_BLOCK_KEYS), _block_value(), max_size=4))
def test_token_prune_block_accepted_as_documented_or_refused_naming_the_key(block):
    expect = _block_ok(block)
    try:
        cfg = parse_config(block)
    except TokenPruneConfigError as e:
        assert expect is not True, (block, str(e))
        msg = str(e)
        named = [k for k in block if f"token_prune.{k}" in msg]
        assert named, (block, msg)
        return
    assert expect is not False, block
    assert cfg.method == block.get("method", "lrcp")
    assert cfg.prune_ratio == float(block.get("prune_ratio", 0.0))
    assert 0.0 <= cfg.ratio_for("image") < 1 and 0.0 <= cfg.ratio_for("video") < 1
    if block.get("video_prune_ratio") is None:
        assert cfg.ratio_for("video") == cfg.ratio_for("image")
    assert cfg.min_keep == block.get("min_keep", 1)
    assert cfg.max_greedy_keep == block.get("max_greedy_keep", 2048)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000])
def test_bridge_answers_pathologically_nested_json(text):
    state = _BridgeState(TokenPruneConfig(), False, ["TokenPruneX"])
    # no guarded key: not parsed at all (vLLM answers the body itself)
    assert rewrite_body(text.encode(), "/v1/chat/completions", state) == (None, None)
    # with one: the parse recurses out, a clean 400
    body = ('{"prune_ratio": 0.5, "x": ' + text).encode()
    new, err = rewrite_body(body, "/v1/chat/completions", state)
    assert new is None and err is not None and err[0] == 400
