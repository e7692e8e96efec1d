"""Budgets on a real CPU server (docs/budgets.md): OpenAI's per-image ``detail``,
``max_visual_tokens`` and ``prune_ratio: "auto"``, on the session ``tp_server`` (TokenPrune
Qwen2.5-VL, LRCP at 0.5, ``low_detail_tokens`` = :data:`tests.conftest.LOW_DETAIL_TOKENS`),
plain HTTP. No server of its own.

Every request's accounting is checked against the same request at ``prune_ratio: 0`` without
budgets: ``usage.prompt_tokens`` falls by exactly the ``tokens - kept`` its ``token_prune``
field reports (:func:`_served`).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.conftest import LOW_DETAIL_TOKENS
from vllm_tokenprune import num_kept
from vllm_tokenprune.testing import content
from vllm_tokenprune.testing.media import image_part, make_image, make_video, video_part
from vllm_tokenprune.testing.server import VLLMServer

pytestmark = pytest.mark.server

PROMPT = "Describe."
LOW = LOW_DETAIL_TOKENS


def _body(server: VLLMServer, parts: list[Any], details: list[Any] | None = None,
          max_tokens: int = 1, **fields: Any) -> dict[str, Any]:
    """A chat body with ``parts`` (PIL images or mp4 bytes) and, per image, its ``detail``
    (``details[i]``; None: no field)."""
    details = list(details or [])
    content_parts = []
    for p in parts:
        if isinstance(p, bytes):
            content_parts.append(video_part(p))
            continue
        part = image_part(p)
        d = details.pop(0) if details else None
        if d is not None:
            part["image_url"]["detail"] = d
        content_parts.append(part)
    content_parts.append({"type": "text", "text": PROMPT})
    return {"model": server.model, "messages": [{"role": "user", "content": content_parts}],
            "max_tokens": max_tokens, "temperature": 0.0, "logprobs": True, "top_logprobs": 3,
            **fields}


def _post(server: VLLMServer, body: dict[str, Any]) -> requests.Response:
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)


def _ok(server: VLLMServer, body: dict[str, Any]) -> dict[str, Any]:
    r = _post(server, body)
    assert r.status_code == 200, r.text[:800]
    return r.json()


_baselines: dict[int, int] = {}


def _served(server: VLLMServer, parts: list[Any], details: list[Any] | None = None,
            **fields: Any) -> dict[str, Any]:
    """The response, with its accounting checked: prompt_tokens == the unpruned request's
    prompt_tokens - (tokens - kept) of the token_prune field."""
    out = _ok(server, _body(server, parts, details, **fields))
    key = hash(tuple(id(p) for p in parts))
    if key not in _baselines:
        _baselines[key] = _ok(server, _body(server, parts, prune_ratio=0))["usage"][
            "prompt_tokens"]
    field = out["token_prune"]
    assert field["kept"] == sum(i["kept"] for i in field["items"])
    assert out["usage"]["prompt_tokens"] == _baselines[key] - (field["tokens"] - field["kept"])
    return out


def _kept(out: dict[str, Any]) -> list[tuple[int, str]]:
    return [(i["kept"], i["why"]) for i in out["token_prune"]["items"]]


def _logprobs(out: dict[str, Any]) -> list[tuple[str, float]]:
    return [(t["token"], t["logprob"]) for t in out["choices"][0]["logprobs"]["content"]]


# 20 tokens each on the tiny Qwen2.5-VL (28-pixel tokens); 12 tokens
A, B = make_image(140, 112, seed=31), make_image(140, 112, seed=32)
SMALL = make_image(112, 84, seed=33)
VIDEO = make_video(112, 84, 4, fps=2.0, seed=34)


def test_detail_per_item(tp_server: VLLMServer) -> None:
    plain = _served(tp_server, [A, B])
    assert _kept(plain) == [(10, "ratio"), (10, "ratio")]
    # "auto" is exactly no field: same prompt, same numbers, same logprobs
    auto = _served(tp_server, [A, B], ["auto", "auto"])
    assert auto["usage"] == plain["usage"] and auto["token_prune"] == plain["token_prune"]
    assert _logprobs(auto) == _logprobs(plain)
    # low caps one item, high keeps every token of the other
    mixed = _served(tp_server, [A, B], ["low", "high"])
    assert _kept(mixed) == [(LOW, "detail"), (20, "detail")]
    mixed = _served(tp_server, [A, B], ["high", "low"])
    assert _kept(mixed) == [(20, "detail"), (LOW, "detail")]
    # low below the ratio's count changes nothing: the stricter wins
    assert _kept(_served(tp_server, [A], ["low"], prune_ratio=0.9)) == [(2, "ratio")]


def test_cap_over_two_images_and_a_video(tp_server: VLLMServer) -> None:
    media = [SMALL, A, VIDEO]
    free = _served(tp_server, media, prune_ratio=0)
    tokens = [i["tokens"] for i in free["token_prune"]["items"]]
    assert [i["modality"] for i in free["token_prune"]["items"]] == ["image", "image", "video"]
    capped = _served(tp_server, media, max_visual_tokens=14)
    assert capped["token_prune"]["kept"] == 14
    assert capped["token_prune"]["max_visual_tokens"] == 14
    assert all(why == "cap" for _, why in _kept(capped))
    # a loose cap: the ratios decide (the stricter wins per item)
    loose = _served(tp_server, media, max_visual_tokens=1000, prune_ratio=0.75,
                    video_prune_ratio=0.25)
    want = [num_kept(tokens[0], 0.75), num_kept(tokens[1], 0.75), num_kept(tokens[2], 0.25)]
    assert _kept(loose) == [(k, "ratio") for k in want]
    # a cap between: only the items whose share is below their ratio's count are cut
    mid = _served(tp_server, [SMALL, A], ["low", None], max_visual_tokens=12)
    assert _kept(mid) == [(LOW, "detail"), (8, "cap")]


def test_auto_follows_content(tp_server: VLLMServer) -> None:
    s = 224  # 64 tokens each
    kinds = ["flat", "gradient", "photo", "text", "chart"]
    images = [content.render(k, s, s) for k in kinds]
    out = _served(tp_server, images, prune_ratio="auto")
    assert out["token_prune"]["ratios"] == {"image": "auto"}
    kept = {k: n for k, (n, why) in zip(kinds, _kept(out), strict=True) if why == "auto"}
    assert len(kept) == len(kinds)
    assert kept["flat"] < kept["photo"] and kept["gradient"] < kept["photo"], kept
    assert kept["text"] > kept["photo"] and kept["chart"] > kept["photo"], kept
    assert _served(tp_server, images, prune_ratio="auto")["token_prune"] == out["token_prune"]
    # auto with a cap and detail: each rule where it is stricter
    both = _served(tp_server, images[:3], ["high", None, "low"], prune_ratio="auto",
                   max_visual_tokens=60)
    assert both["token_prune"]["kept"] <= 60


def _mix() -> list[tuple[list[Any], list[Any] | None, dict[str, Any]]]:
    page = content.render("text", 224, 168)
    return [
        ([A], None, {}),
        ([A, B], ["low", "high"], {}),
        ([SMALL, A, VIDEO], None, {"max_visual_tokens": 14}),
        ([page], None, {"prune_ratio": "auto"}),
        ([B], ["auto"], {"prune_ratio": 0.75}),
        ([A, page], ["low", None], {"prune_ratio": "auto", "max_visual_tokens": 20}),
        ([SMALL], None, {"prune_ratio": 0.25, "prune_method": "norm"}),
        ([B, SMALL], ["high", "high"], {"max_visual_tokens": 9}),
    ]


def test_concurrent_mix_equals_each_alone(tp_server: VLLMServer) -> None:
    cases = _mix()
    bodies = [_body(tp_server, parts, details, max_tokens=3, **fields)
              for parts, details, fields in cases]
    alone = [_ok(tp_server, copy.deepcopy(b)) for b in bodies]
    jobs = [bodies[i % len(bodies)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: _ok(tp_server, copy.deepcopy(b)), jobs))
    for i, got in enumerate(together):
        want = alone[i % len(bodies)]
        assert got["usage"] == want["usage"], i
        assert got["token_prune"] == want["token_prune"], i
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"][
            "content"], i
        assert [t for t, _ in _logprobs(got)] == [t for t, _ in _logprobs(want)]
        assert [lp for _, lp in _logprobs(got)] == pytest.approx(
            [lp for _, lp in _logprobs(want)], abs=1e-3)


def _metric(server: VLLMServer, reason: str) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tokenprune_item_kept_visual_tokens_sum{")
               and f'reason="{reason}"' in line)


def test_kept_tokens_by_reason_metric(tp_server: VLLMServer) -> None:
    before = {r: _metric(tp_server, r) for r in ("ratio", "detail", "cap", "auto")}
    out = _ok(tp_server, _body(tp_server, [A, B, SMALL], ["low", "high"], max_visual_tokens=26))
    after = {r: _metric(tp_server, r) for r in before}
    want = dict.fromkeys(before, 0.0)
    for kept, why in _kept(out):
        want[why] += kept
    assert {r: after[r] - before[r] for r in before} == want


BAD = [
    ({"max_visual_tokens": 0}, "max_visual_tokens"),
    ({"max_visual_tokens": 1.5}, "max_visual_tokens"),
    ({"max_visual_tokens": "many"}, "max_visual_tokens"),
    ({"max_visual_tokens": True}, "max_visual_tokens"),
    ({"max_visual_tokens": 1}, "max_visual_tokens"),  # two items keep at least 1 each
    ({"prune_ratio": "automatic"}, "prune_ratio"),
    ({"video_prune_ratio": "Auto"}, "video_prune_ratio"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[f"{p}={v}" for (f, p) in BAD
                                                        for v in [f[p]]])
def test_bad_values_are_refused_and_the_server_keeps_serving(tp_server: VLLMServer,
                                                           fields: dict[str, Any],
                                                           param: str) -> None:
    r = _post(tp_server, _body(tp_server, [SMALL, SMALL], **fields))
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["param"] == param, r.text[:500]
    assert _ok(tp_server, _body(tp_server, [SMALL]))["token_prune"]["kept"] == 6


@pytest.mark.parametrize("detail", ["tiny", 3, None])
def test_bad_detail_is_refused(tp_server: VLLMServer, detail: Any) -> None:
    body = _body(tp_server, [SMALL, SMALL], ["low", detail])
    r = _post(tp_server, body)
    if detail is None:  # no detail on the second image: served
        assert r.status_code == 200
        return
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["param"] == "messages[0].content[1].image_url.detail"
    assert _ok(tp_server, _body(tp_server, [SMALL]))["token_prune"]["kept"] == 6
