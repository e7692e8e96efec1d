"""The ``token_prune`` response field (vllm_tokenprune.response) on a real server, read with the
real ``openai`` client and plain HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import DEFAULT_RATIO
from vllm_tokenprune import num_kept
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.testing.media import chat_messages, make_image, qwen_image_tokens
from vllm_tokenprune.testing.server import VLLMServer

pytestmark = pytest.mark.server

PROMPT = "Describe this image."


def _kwargs(server: VLLMServer, images: list[Any], **extra: Any) -> dict[str, Any]:
    return dict(model=server.model, messages=chat_messages(images, PROMPT), max_tokens=2,
                temperature=0.0, extra_body=extra or None)


def chat(server: VLLMServer, images: list[Any], **extra: Any) -> Any:
    return server.openai().chat.completions.create(**_kwargs(server, images, **extra))


def stream(server: VLLMServer, images: list[Any], include_usage: bool, **extra: Any) -> list[Any]:
    kwargs = _kwargs(server, images, **extra)
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    return list(server.openai().chat.completions.create(stream=True, **kwargs))


def expect_items(model_dir: Path, images: list[Any], ratio: float) -> list[dict[str, Any]]:
    out = []
    for i, im in enumerate(images):
        n = qwen_image_tokens(model_dir, im)
        out.append({"modality": "image", "index": i, "tokens": n, "kept": num_kept(n, ratio),
                    "why": "ratio"})
    return out


IMAGES = [make_image(280, 224, seed=31), make_image(196, 336, seed=32)]


def test_non_streamed_field_is_exact(tp_server: VLLMServer, tiny_qwen_dir: Path):
    base = chat(tp_server, IMAGES, prune_ratio=0.0)
    assert base.model_extra[FIELD]["tokens"] == base.model_extra[FIELD]["kept"]
    for ratio, method in ((0.75, "lrcp"), (0.889, "svd_prune")):
        r = chat(tp_server, IMAGES, prune_ratio=ratio, prune_method=method)
        field = r.model_extra[FIELD]
        assert field["method"] == method
        assert field["ratios"] == {"image": ratio}
        assert field["items"] == expect_items(tiny_qwen_dir, IMAGES, ratio)
        saved = sum(i["tokens"] - i["kept"] for i in field["items"])
        assert saved == base.usage.prompt_tokens - r.usage.prompt_tokens
        assert (field["tokens"], field["kept"]) == (
            sum(i["tokens"] for i in field["items"]), sum(i["kept"] for i in field["items"]))


def test_server_default_and_processor_cache_hit(tp_server: VLLMServer, tiny_qwen_dir: Path):
    """No ratio in the request: the server's default is reported. The same request again is
    served from vLLM's processor cache and reports the same numbers."""
    images = [make_image(224, 224, seed=33)]
    first = chat(tp_server, images).model_extra[FIELD]
    again = chat(tp_server, images).model_extra[FIELD]
    assert first == again
    assert first["method"] == "lrcp" and first["ratios"] == {"image": DEFAULT_RATIO}
    assert first["items"] == expect_items(tiny_qwen_dir, images, DEFAULT_RATIO)


def test_streamed_field_rides_the_usage_chunk(tp_server: VLLMServer, tiny_qwen_dir: Path):
    ratio = 0.75
    chunks = stream(tp_server, IMAGES, include_usage=True, prune_ratio=ratio)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    field = final.model_extra[FIELD]
    assert field["items"] == expect_items(tiny_qwen_dir, IMAGES, ratio)
    assert all(FIELD not in (c.model_extra or {}) for c in chunks[:-1])
    plain = chat(tp_server, IMAGES, prune_ratio=ratio)
    assert final.usage.prompt_tokens == plain.usage.prompt_tokens
    assert field == plain.model_extra[FIELD]


def test_stream_without_usage_is_unchanged(tp_server: VLLMServer):
    """No usage chunk asked for: no chunk is added and none carries the field (vLLM's rule for
    its own per-request metrics)."""
    chunks = stream(tp_server, IMAGES, include_usage=False, prune_ratio=0.5)
    assert chunks and all(c.choices for c in chunks)
    assert all(FIELD not in (c.model_extra or {}) for c in chunks)


def test_text_only_has_no_field(tp_server: VLLMServer):
    r = tp_server.openai().chat.completions.create(
        model=tp_server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=2,
        extra_body={"prune_ratio": 0.5})
    assert FIELD not in (r.model_extra or {})
    chunks = list(tp_server.openai().chat.completions.create(
        model=tp_server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=2,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    assert all(FIELD not in (c.model_extra or {}) for c in chunks)


def test_plain_http_json_and_concurrent_requests(tp_server: VLLMServer, tiny_qwen_dir: Path):
    """Concurrent requests with different ratios each get their own details; the raw body is
    valid JSON with a correct Content-Length."""
    ratios = [0.0, 0.25, 0.5, 0.75, 0.889, 0.9]

    def one(i: int) -> tuple[float, dict[str, Any], int]:
        images = [make_image(224 + 28 * (i % 3), 224, seed=40 + i)]
        body = {"model": tp_server.model, "messages": chat_messages(images, PROMPT),
                "max_tokens": 1, "prune_ratio": ratios[i]}
        resp = requests.post(f"{tp_server.base_url}/v1/chat/completions", json=body, timeout=300)
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["content-length"]) == len(resp.content)
        data = resp.json()
        n = qwen_image_tokens(tiny_qwen_dir, images[0])
        return ratios[i], data[FIELD], n

    with ThreadPoolExecutor(len(ratios)) as pool:
        results = list(pool.map(one, range(len(ratios))))
    for ratio, field, n in results:
        assert field["ratios"] == {"image": ratio}
        assert field["items"] == [{"modality": "image", "index": 0, "tokens": n,
                                   "kept": num_kept(n, ratio), "why": "ratio"}]
