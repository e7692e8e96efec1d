"""TokenPruneQwen2_5_VLForConditionalGeneration on a real vLLM CPU server: the shared suite of
tests/_suite.py on images and videos (mp4 ``video_url`` data URLs decoded by vLLM's OpenCV
loader), against the session's Qwen2.5-VL servers (tests/conftest.py: TokenPrune and vLLM's own
plain architecture on the same weights, the suite's one direct comparison with it), plus what
only this family checks: cache keys (encoder, processor and prefix caches), bad request fields,
the plain architecture refusing ``prune_ratio``, and the config endpoint. Qwen2.5-VL scales
video time positions by ``second_per_grid_ts * tokens_per_second``; the reference tests check
the kept tokens' positions against transformers' Qwen2.5-VL."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import requests

from tests._suite import (
    LOGPROB_TOL,
    FamilyServerSuite,
    assert_matches_reference,
    gap,
    top_logprobs,
)
from tests.conftest import DEFAULT_RATIO, QWEN25_ARCH
from vllm_tokenprune.preview import preview
from vllm_tokenprune.testing.media import chat_messages, image_part, make_image
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides
from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

pytestmark = pytest.mark.server

PROMPT = "Describe this image."
#: The session TokenPrune server's --hf-overrides (tests/conftest.py).
OVERRIDES = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=DEFAULT_RATIO)


class TestQwen2_5_VL(FamilyServerSuite):
    ARCH = QWEN25_ARCH
    NAME = "qwen2_5_vl"
    BUILDER = staticmethod(build_qwen2_5_vl)
    CASES = [
        [("image", 224, 224, 10)],
        [("image", 448, 308, 10)],
        [("image", 280, 168, 10), ("image", 336, 420, 11)],
        [("video", 112, 84, 8, 1)],
        [("video", 140, 112, 6, 2)],
        [("image", 224, 224, 3), ("video", 112, 84, 8, 1)],
        [("video", 112, 84, 8, 4), ("video", 84, 112, 4, 5)],
    ]
    RATIOS = [0.25, 0.5, 0.75, 0.889, 0.95]
    EXACT_MEDIA = [("image", 280, 224, 5), ("video", 112, 84, 8, 1)]
    MIXED_MEDIA = [("video", 112, 84, 8, 3), ("image", 224, 224, 7), ("video", 140, 112, 6, 4),
                   ("image", 308, 196, 8)]

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_qwen_dir: Path) -> Path:
        return tiny_qwen_dir

    @pytest.fixture(scope="class")
    @classmethod
    def tp(cls, tp_server: VLLMServer) -> VLLMServer:
        return tp_server

    @pytest.fixture(scope="class")
    @classmethod
    def plain(cls, plain_server: VLLMServer) -> VLLMServer:
        return plain_server

    @pytest.mark.parametrize("method", ["lrcp", "svd_prune", "resprune", "uniform", "divprune"])
    def test_two_images_match_transformers_reference(self, tp: VLLMServer, model_dir: Path,
                                                     method: str) -> None:
        """Two images in one prompt (the suite's reference test has an image and a video): the
        server's next-token logprobs == transformers' Qwen2.5-VL fed only the kept image
        embeddings at their original M-RoPE positions, with the controls of
        :func:`assert_matches_reference`. The server splits this prompt over several
        chunked-prefill steps (96 tokens a step), so positions survive chunking too."""
        images = [make_image(336, 252, seed=5), make_image(224, 280, seed=6)]
        ratio = 0.75
        res = chat(tp, images, logprobs=True, prune_ratio=ratio, prune_method=method,
                   return_tokens_as_token_ids=True)
        assert_matches_reference(res, model_dir, images, method, ratio, overrides=OVERRIDES,
                                 label="qwen2_5_vl images")


def chat(server: VLLMServer, images: list[Any], text: str = PROMPT, *, max_tokens: int = 1,
         logprobs: bool = False, **extra: Any) -> Any:
    client = server.openai()
    kwargs: dict[str, Any] = {}
    if logprobs:
        kwargs = {"logprobs": True, "top_logprobs": 5}
    return client.chat.completions.create(
        model=server.model,
        messages=chat_messages(images, text),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra or None,
        **kwargs,
    )


# --------------------------------------------------------------------------- caches


def test_same_image_two_ratios_no_cache_mixup(tp_server):
    """Encoder cache + prefix cache: the same image at two ratios must not share embeddings."""
    images = [make_image(280, 280, seed=42)]
    a1 = chat(tp_server, images, logprobs=True, prune_ratio=0.5)
    b = chat(tp_server, images, logprobs=True, prune_ratio=0.8)
    a2 = chat(tp_server, images, logprobs=True, prune_ratio=0.5)
    assert b.usage.prompt_tokens < a1.usage.prompt_tokens == a2.usage.prompt_tokens
    lp = [r.choices[0].logprobs.content[0].top_logprobs[0].logprob for r in (a1, b, a2)]
    assert lp[0] == pytest.approx(lp[2], abs=1e-5)


def test_text_conditioned_cache_keys(tp_server, tiny_qwen_dir):
    """ResPrune depends on the prompt: the same image under two prompts must not reuse the
    encoder output selected for the other prompt. Item uuids pin the cache identity of the
    image, so request 2 would hit request 1's cache entry if the prompt were not part of it;
    request 3 uses a fresh uuid (a cold cache). First: the two prompts select different tokens
    for this image (otherwise warm == cold would hold whatever the key is); then warm == cold
    == the reference for prompt 2."""
    img = make_image(336, 336, seed=7)
    text1 = "What colour is the sky in this picture? Answer with one word."
    text2 = "Count the objects on the table, please."
    ratio, method = 0.9, "resprune"
    kept = [preview(tiny_qwen_dir, [img], method, ratio, prompt=t,
                    hf_overrides=OVERRIDES).items[0].kept_rows for t in (text1, text2)]
    assert len(kept[0]) == len(kept[1]) and kept[0] != kept[1]
    client = tp_server.openai()

    def ask(text: str, uuid: str) -> Any:
        msgs = [{"role": "user", "content": [image_part(img, uuid=uuid),
                                             {"type": "text", "text": text}]}]
        return client.chat.completions.create(
            model=tp_server.model, messages=msgs, max_tokens=1, temperature=0.0, logprobs=True,
            top_logprobs=5, extra_body={"prune_ratio": ratio, "prune_method": method,
                                        "return_tokens_as_token_ids": True})

    ask(text1, "img-a")
    warm = ask(text2, "img-a")
    cold = ask(text2, "img-b")
    assert set(top_logprobs(warm)) == set(top_logprobs(cold))
    assert gap(top_logprobs(warm), top_logprobs(cold)) <= LOGPROB_TOL
    assert_matches_reference(warm, tiny_qwen_dir, [img], method, ratio, overrides=OVERRIDES,
                             text=text2, label="qwen2_5_vl cache key")


def _prefix_cache_hits(server: VLLMServer) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_prefix_cached_request_matches_reference(tp_server, tiny_qwen_dir):
    """Positions across prefix caching, against the reference. A 448x336 image is a 12 x 16
    grid (non-square: h/w swapped positions differ), 192 tokens, 144 kept at ratio 0.25: the
    first 128-token KV block (vLLM's CPU block size) ends inside the image. Request 1 caches
    it; request 2 (the same image, another question) starts from that block, so the image's
    remaining kept tokens and the new text are prefilled after it, their M-RoPE positions
    filled from the cached offset. Request 2's logprobs equal the reference's; the reference
    with h and w swapped, or one column off, differs by more than ten tolerances."""
    img = make_image(448, 336, seed=12)
    question = "How many objects are there?"
    chat(tp_server, [img], "What is in the picture?", prune_ratio=0.25)
    before = _prefix_cache_hits(tp_server)
    res = chat(tp_server, [img], question, logprobs=True, prune_ratio=0.25,
               return_tokens_as_token_ids=True)
    assert _prefix_cache_hits(tp_server) - before >= 128  # one whole block came from the cache
    assert_matches_reference(res, tiny_qwen_dir, [img], "lrcp", 0.25, overrides=OVERRIDES,
                             text=question, label="qwen2_5_vl prefix cached")


# --------------------------------------------------------------------------- bad input


BAD_VALUES = [
    ("prune_ratio", 1),
    ("prune_ratio", -0.1),
    ("prune_ratio", "abc"),
    ("prune_ratio", True),
    ("prune_ratio", None),
    ("prune_ratio", "NaN"),  # sent as a bare JSON NaN token below
    ("video_prune_ratio", 1.5),
    ("prune_method", "no-such-method"),
    ("prune_method", 3),
    ("prune_method", "alvts"),  # known, not enabled on this server (docs/alvts.md)
]


def _raw_request(server: VLLMServer, field: str, value: Any) -> requests.Response:
    body = {
        "model": server.model,
        "messages": chat_messages([make_image(224, 224, seed=9)], PROMPT),
        "max_tokens": 1,
        field: value,
    }
    text = json.dumps(body)
    if value == "NaN":
        text = text.replace('"NaN"', "NaN")
    return requests.post(server.base_url + "/v1/chat/completions", data=text,
                         headers={"Content-Type": "application/json"}, timeout=120)


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_request_fields_get_400_naming_the_field(tp_server, field, value):
    r = _raw_request(tp_server, field, value)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field
    assert field in err["message"]
    # the server keeps serving
    ok = chat(tp_server, [make_image(224, 224, seed=9)], prune_ratio=0.5)
    assert ok.usage.prompt_tokens > 0


def test_openai_client_bad_ratio_raises_bad_request(tp_server):
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        chat(tp_server, [make_image(224, 224)], prune_ratio=2.0)
    assert "prune_ratio" in str(exc.value)


def test_prune_ratio_on_model_without_tokenprune_arch(plain_server):
    r = _raw_request(plain_server, "prune_ratio", 0.5)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prune_ratio"
    assert "TokenPrune" in r.json()["error"]["message"]
    ok = chat(plain_server, [make_image(224, 224)])
    assert ok.usage.prompt_tokens > 0


def test_untrusted_mm_processor_kwargs_still_refused(tp_server):
    """The bridge writes mm_processor_kwargs itself, but a client still may not (vLLM's rule
    without --trust-request-mm-kwargs)."""
    r = _raw_request(tp_server, "mm_processor_kwargs", {"max_pixels": 10**9})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "mm_processor_kwargs"


def test_config_endpoint(tp_server):
    r = requests.get(tp_server.base_url + "/v1/tokenprune/config", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["enabled"] is True
    assert body["config"]["method"] == "lrcp"
    assert math.isclose(body["config"]["prune_ratio"], DEFAULT_RATIO)
    assert "prune_ratio" in body["request_fields"]
