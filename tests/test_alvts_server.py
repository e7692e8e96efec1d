"""ALVTS served by real vLLM CPU servers: Qwen2.5-VL (compiled: vLLM's default compilation, no
``--enforce-eager``), LLaVA-1.5 and LLaVA-NeXT (eager) (docs/alvts.md).

Every check goes through the real ``openai`` client (or plain HTTP for ``/metrics``):

* ``prune_ratio`` 0 with ``alvts`` (routed: the selector runs, every token goes through) gives
  the plain architecture's greedy tokens and logprobs (Qwen2.5-VL: vLLM's own architecture,
  the session's plain server; LLaVA-1.5: transformers' unpruned model, step by step);
* next-token logprobs at two ratios equal transformers' own model routed by
  :mod:`vllm_tokenprune.alvts.reference` (same selector, layers, skipped tokens and K/V rule;
  LLaVA-NeXT's image-newline tokens always go through), compared on the reference's top-5
  tokens, where the unrouted model differs by far more than the tolerance;
* routing does not depend on batching or chunking: mixed requests (alvts and input-side
  methods, several ratios, one or two images) give the same tokens and logprobs served one at a
  time and all at once, on a server whose small token budget splits multi-image prompts across
  prefill steps;
* ``usage.prompt_tokens`` does not move with the ratio; ``/metrics`` counts the skipped visual
  token-layers exactly, where an item is routed (a ratio-0 item or one read from the prefix
  cache adds nothing); an image routed at one ratio is never reused for another;
* prefix caching on (vLLM's default): a second chat turn reuses the first's blocks and gives
  the logprobs a cold cache gives; a hit that would end inside an image is cut back to the
  block before it (``alvts/scheduler.py``); another ratio does not reuse the image's blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests import _pool
from tests._suite import record_error
from tests.conftest import QWEN25_ARCH, tiny_qwen
from vllm_tokenprune import num_kept
from vllm_tokenprune.alvts import AlvtsOptions
from vllm_tokenprune.alvts.reference import routed
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.testing.media import make_image, media_messages
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

pytestmark = pytest.mark.server

LLAVA_ARCH = "TokenPruneLlavaForConditionalGeneration"
LLAVA_NEXT_ARCH = "TokenPruneLlavaNextForConditionalGeneration"
#: What ``alvts`` needs from the server (it refuses to start without them). The Qwen2.5-VL
#: server runs vLLM's default compilation (:data:`COMPILED`); the LLaVA ones are eager (the test
#: servers' default). Prefix caching stays on (vLLM's default), in blocks of 32
#: tokens (the CPU backend's smallest) so a hit can end inside a test image; the response's
#: ``usage.prompt_tokens_details.cached_tokens`` shows the hits.
ALVTS_FLAGS = ["--disable-chunked-mm-input",
               "--scheduler-cls", "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler",
               "--block-size", "32", "--enable-prompt-tokens-details"]
BLOCK = 32
#: A token budget per step that holds the largest item (vLLM refuses to start otherwise under
#: --disable-chunked-mm-input) but not a prompt with two images: such prompts are split
#: across prefill steps. Qwen's largest item is capped at 64 tokens (max_pixels) for that; the
#: test images (48 tokens) are below the cap, so the processor does not resize them; no video
#: (vLLM's largest Qwen video item would need a budget of 448: the ``alvts`` video test runs on
#: tests/test_prometheus.py's server, docs/alvts.md).
BUDGET = "100"
QWEN_CAP = ["--mm-processor-kwargs", '{"max_pixels": 50176}',
            "--limit-mm-per-prompt", '{"image": 4, "video": 0}']
BASE_ARGS = ["--dtype", "float32", "--seed", "0"]
#: No --enforce-eager (undoes the test servers' default): vLLM's default compilation, which
#: the CPU build runs as one Dynamo trace compiled by Inductor (no CUDA graphs on CPU); the
#: routed tail is the opaque op ``tokenprune::alvts_layer_tail`` (``alvts/compiled.py``).
COMPILED = ["--no-enforce-eager"]
PROMPT = "Describe this image."
#: Both sides float32 on CPU (measured ~1e-6, docs/testing.md).
LOGPROB_TOL = 1e-4
#: Served one at a time vs in a batch: same kernels on different batch shapes.
BATCH_TOL = 1e-4
#: The unrouted reference (the control) must differ from the routed server by more than this
#: many tolerances on the compared token ids: the comparison can tell routing from none.
CONTROL_FACTOR = 10

FAMILIES = {
    # Qwen2.5-VL (2 decoder layers) routes from layer 0: the first layer's own path too.
    "qwen": {"arch": QWEN25_ARCH, "alvts": {"first_layer": 0}, "size": (224, 168)},
    # LLaVA-1.5 (3 decoder layers) routes layers 1-2.
    "llava": {"arch": LLAVA_ARCH, "alvts": {"first_layer": 1}, "size": (112, 112)},
    # LLaVA-NeXT (3 decoder layers): base image + tiles with image-newline rows.
    "llava_next": {"arch": LLAVA_NEXT_ARCH, "alvts": {"first_layer": 1}, "size": (150, 260)},
}


def overrides(family: str) -> str:
    f = FAMILIES[family]
    return token_prune_overrides(f["arch"], method="lrcp", prune_ratio=0.0,
                                 allowed_methods=["lrcp", "random", "alvts"],
                                 options={"alvts": f["alvts"]})


def _llava(p: _pool.Pool) -> Path:
    from vllm_tokenprune.testing.tiny_model import build_llava

    return p.cached("alvts:llava", lambda: build_llava(
        p.tmp("tiny") / "llava_alvts", seed=0, text_layers=3))


def _llava_next(p: _pool.Pool) -> Path:
    from vllm_tokenprune.testing.tiny_model import build_llava_next

    return p.cached("alvts:llava_next", lambda: build_llava_next(
        p.tmp("tiny") / "llava_next_alvts", seed=0, text_layers=3))


@_pool.factory("alvts", servers=3)
def _alvts_servers(p: _pool.Pool) -> dict[str, Any]:
    """An alvts-enabled server per family, launched together."""
    args = [*BASE_ARGS, "--max-num-batched-tokens", BUDGET, *ALVTS_FLAGS]
    qwen = [*args, *QWEN_CAP, *COMPILED]
    specs = {
        "qwen": (tiny_qwen(p), [*qwen, "--hf-overrides", overrides("qwen")]),
        "llava": (_llava(p), [*args, "--hf-overrides", overrides("llava")]),
        "llava_next": (_llava_next(p), [*BASE_ARGS, *ALVTS_FLAGS,
                                        "--hf-overrides", overrides("llava_next")]),
    }
    started: dict[str, Any] = {}
    try:
        for label, (model, server_args) in specs.items():
            started[label] = VLLMServer(model, server_args, wait=False,
                                        log_path=_pool.log_dir() / f"alvts_{label}.log")
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


_pool.uses("test_alvts_server.py", "servers", "alvts")


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, plain_server: VLLMServer) -> Iterator[dict[str, Any]]:
    """An alvts-enabled server per family (:func:`_alvts_servers`). The unpruned side: the
    session's plain Qwen2.5-VL server (vLLM's own architecture on the same weights; the test
    images are below the alvts server's max_pixels cap, so both see the same tokens) and, for
    LLaVA, transformers' unpruned model (:func:`tests._hf_reference.prepared_step_logprobs`)."""
    p = _pool.pool(request.config)
    started = p.take("alvts")
    yield {**started, "qwen_plain": plain_server, "qwen_dir": tiny_qwen(p),
           "llava_dir": _llava(p), "llava_next_dir": _llava_next(p)}
    for server in started.values():
        server.stop()


def images(family: str, *seeds: int) -> list[Any]:
    return [make_image(*FAMILIES[family]["size"], seed=s) for s in seeds]


def chat(server: VLLMServer, media: list[Any], *, max_tokens: int = 1, text: str = PROMPT,
         **extra: Any) -> Any:
    return server.openai().chat.completions.create(
        model=server.model, messages=media_messages(media, text), max_tokens=max_tokens,
        temperature=0.0, logprobs=True, top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, **extra})


def top(res: Any, step: int = 0) -> dict[int, float]:
    entries = res.choices[0].logprobs.content[step].top_logprobs
    return {int(e.token.removeprefix("token_id:")): e.logprob for e in entries}


def gap(got: dict[int, float], ref: torch.Tensor) -> float:
    """Largest |server - reference| log-probability over the server's compared token ids."""
    return max(abs(lp - float(ref[t])) for t, lp in got.items())


def top_ids(ref: torch.Tensor, k: int = 5) -> list[int]:
    return [int(t) for t in ref.topk(k).indices]


def cached(res: Any) -> int:
    details = res.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def tokens(res: Any) -> list[str]:
    return [t.token for t in res.choices[0].logprobs.content]


@torch.no_grad()
def reference(model_dir: Path, family: str, media: list[Any], ratio: float,
              text: str = PROMPT) -> tuple[torch.Tensor, int]:
    """transformers' model routed by the reference: (next-token logprobs, skipped
    token-layers)."""
    from vllm_tokenprune.preview._extract import prepare

    prep = prepare(str(model_dir), media, text)
    opts = AlvtsOptions(**FAMILIES[family]["alvts"])
    scored = [item.scored for item in prep.items]  # LLaVA-NeXT: not its newline rows
    with routed(prep.model, prep.inputs["input_ids"], ratio, opts, scored=scored) as log:
        logits = prep.model(**prep.inputs).logits[0, -1]
    return logits.float().log_softmax(-1), log.skipped_token_layers()


def scrape_skipped(server: VLLMServer) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(r'tokenprune_skipped_visual_token_layers_total\{[^}]*\} (\S+)', line)
        if m:
            total += float(m.group(1))
    return total


def partial_items(server: VLLMServer) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'tokenprune_scorer_fallbacks_total\{[^}]*reason="partial_item"[^}]*\} (\S+)', text))


# --------------------------------------------------------------------------- tests


def test_the_qwen_server_is_compiled(servers: dict[str, Any]) -> None:
    """What the other tests check on Qwen2.5-VL, they check on a compiled model: vLLM's CPU
    runner compiled it (its warm-up runs only when the mode is not NONE), with Inductor."""
    log = servers["qwen"].log_text()
    assert "enforce_eager=False" in log and "Warming up model for the compilation" in log
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in log and "'backend': 'inductor'" in log
    assert "enforce_eager=True" in servers["llava"].log_text()  # the eager control


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_ratio_zero_is_the_plain_architecture(servers: dict[str, Any], family: str) -> None:
    """Ratio 0 goes through the routed layers (the selector scores the item and every token
    goes through: ``alvts/model.py``); images no other test sends, so nothing comes from the
    prefix cache. Qwen2.5-VL: 8 greedy tokens, their logprobs and the prompt count equal vLLM's
    plain architecture's. LLaVA-1.5: the top-5 logprobs of each of the 8 greedy steps equal
    transformers' unpruned model's, fed the prompt and the tokens the server generated before
    that step, and the server's token is the reference's argmax."""
    from tests._hf_reference import _kept_rows, prepare, prepared_step_logprobs

    media = images(family, 61, 62)
    got = chat(servers[family], media, max_tokens=8, prune_method="alvts", prune_ratio=0.0)
    if family == "qwen":
        plain = chat(servers["qwen_plain"], media, max_tokens=8)
        assert tokens(got) == tokens(plain)
        assert got.usage.prompt_tokens == plain.usage.prompt_tokens
        lp_a = [t.logprob for t in plain.choices[0].logprobs.content]
        lp_b = [t.logprob for t in got.choices[0].logprobs.content]
        assert lp_b == pytest.approx(lp_a, abs=BATCH_TOL)
        return
    prep = prepare(str(servers["llava_dir"]), media, PROMPT)
    every = _kept_rows(prep, {"image": 0.0}, "lrcp", 1, None)  # ratio 0: every row
    assert [len(k) for k in every] == [item.num_tokens for item in prep.items]
    generated = [int(t.token.removeprefix("token_id:"))
                 for t in got.choices[0].logprobs.content]
    steps = prepared_step_logprobs(prep, every, generated[:-1])
    for k, token in enumerate(generated):
        assert float(steps[k].max() - steps[k][token]) <= LOGPROB_TOL, k
        assert gap(top(got, k), steps[k]) <= LOGPROB_TOL, k


@pytest.mark.parametrize("ratio", [0.5, 0.889])
@pytest.mark.parametrize("family", ["qwen", "llava", "llava_next"])
def test_logprobs_match_transformers_reference(servers: dict[str, Any], family: str,
                                               ratio: float) -> None:
    media = images(family, 1, 2)
    res = chat(servers[family], media, prune_method="alvts", prune_ratio=ratio)
    ref, skipped = reference(servers[f"{family}_dir"], family, media, ratio)
    unrouted, _ = reference(servers[f"{family}_dir"], family, media, 0.0)
    got = top(res)
    ids = top_ids(ref)
    assert sorted(got) == sorted(ids)  # the server's top 5 are the reference's
    err = gap(got, ref)
    assert err <= LOGPROB_TOL, err
    # the control: on the same tokens (the reference's top 5), the unrouted model differs
    # from the server by far more than the tolerance (the comparison would see routing that
    # does nothing)
    assert skipped > 0
    control = gap({t: got[t] for t in ids}, unrouted)
    record_error(f"alvts {family}\t{ratio}\t{err:.3g}\tunrouted={control:.3g}")
    assert control > CONTROL_FACTOR * LOGPROB_TOL, control
    # ratio 0 is the unrouted model (on the unrouted reference's top 5)
    zero = top(chat(servers[family], media, prune_method="alvts", prune_ratio=0.0))
    assert sorted(zero) == sorted(top_ids(unrouted))
    for token_id, logprob in zero.items():
        assert logprob == pytest.approx(float(unrouted[token_id]), abs=LOGPROB_TOL)


def test_prompt_tokens_unchanged_and_skipped_layers_counted(servers: dict[str, Any]) -> None:
    server, plain = servers["qwen"], servers["qwen_plain"]
    media = images("qwen", 3)
    unpruned = chat(plain, media).usage.prompt_tokens
    n = 48  # 224x168 image: (168/28) x (224/28) merged tokens
    layers = 2  # routed layers 0 and 1
    before = scrape_skipped(server)
    expected = 0
    for ratio in (0.0, 0.3, 0.889):
        res = chat(server, media, prune_method="alvts", prune_ratio=ratio)
        assert res.usage.prompt_tokens == unpruned
        field = res.model_extra[FIELD]
        item = field["items"][0]
        assert (item["tokens"], item["kept"]) == (n, n)  # nothing dropped at the input
        assert (item["routed_per_layer"], item["routed_layers"]) == (num_kept(n, ratio), layers)
        assert field["skipped_token_layers"] == (n - num_kept(n, ratio)) * layers
        expected += (n - num_kept(n, ratio)) * layers
    assert scrape_skipped(server) - before == expected


def test_routing_does_not_depend_on_batching_or_chunking(servers: dict[str, Any]) -> None:
    """12 mixed requests served one at a time, then all at once (16 in flight with 4 more),
    with exact prompt-token accounting; two-image prompts exceed the step budget, so their
    prefill spans steps (an item itself is never split: --disable-chunked-mm-input), and every
    routed one equals the reference computed in one forward."""
    server = servers["qwen"]
    cases = []
    for i in range(12):
        seeds = (10 + i,) if i % 3 else (10 + i, 30 + i)
        method = "alvts" if i % 4 != 3 else ("lrcp" if i % 8 == 3 else "random")
        ratio = (0.3, 0.5, 0.889)[i % 3]
        text = PROMPT + " Answer briefly." * (i % 4)
        cases.append((images("qwen", *seeds), {"prune_method": method, "prune_ratio": ratio},
                      text))

    def one(i: int, salt: str | None = None) -> Any:
        media, extra, text = cases[i % len(cases)]
        more = {"cache_salt": f"{salt}-{i}"} if salt else {}
        return chat(server, media, max_tokens=3, text=text, **extra, **more)

    alone = [one(i) for i in range(len(cases))]
    with ThreadPoolExecutor(16) as pool:  # salted: computed concurrently, not read from cache
        together = list(pool.map(lambda i: one(i, "together"), range(16)))
    for i, (a, b) in enumerate(zip(alone, together, strict=False)):
        assert tokens(b) == tokens(a), cases[i][1]
        for step in range(len(tokens(a))):  # up to 3 (fewer where the model stops)
            ta, tb = top(a, step), top(b, step)
            assert set(ta) == set(tb), (i, step)
            for t in ta:
                assert tb[t] == pytest.approx(ta[t], abs=BATCH_TOL), (i, step, cases[i][1])
    # no routed item ever arrived split across steps (the worker would not route it)
    assert partial_items(server) == 0
    n = 48  # visual tokens of a 224x168 image
    for i, (media, extra, text) in enumerate(cases):
        # exact accounting: alvts keeps every token, input-side methods drop N - k per image
        unpruned = chat(servers["qwen_plain"], media, text=text).usage.prompt_tokens
        dropped = 0 if extra["prune_method"] == "alvts" else \
            len(media) * (n - num_kept(n, extra["prune_ratio"]))
        assert alone[i].usage.prompt_tokens == together[i].usage.prompt_tokens \
            == unpruned - dropped, extra
        if extra["prune_method"] != "alvts":
            continue
        # the routed requests are the reference's (one forward over the whole prompt; the
        # two-image ones were split across prefill steps by the server)
        ref, _ = reference(servers["qwen_dir"], "qwen", media, extra["prune_ratio"], text)
        for t, logprob in top(alone[i]).items():
            assert logprob == pytest.approx(float(ref[t]), abs=LOGPROB_TOL), (i, extra)


def test_an_image_routed_at_one_ratio_is_not_reused_for_another(
        servers: dict[str, Any]) -> None:
    server = servers["llava"]
    media = images("llava", 7)
    a = chat(server, media, prune_method="alvts", prune_ratio=0.5)
    b = chat(server, media, prune_method="alvts", prune_ratio=0.889)
    c = chat(server, media, prune_method="alvts", prune_ratio=0.5)
    d = chat(server, media, prune_method="lrcp", prune_ratio=0.5)
    assert top(c) == pytest.approx(top(a), abs=BATCH_TOL)
    *spans, (n, _) = _image_spans(servers["llava_dir"], media, PROMPT)
    assert cached(c) == _expected_hit(spans, n)  # c reads a's blocks (same ratio)...
    assert cached(b) <= spans[0][0]  # ...b none of the image's (another ratio)
    refs = {r: reference(servers["llava_dir"], "llava", media, r)[0] for r in (0.5, 0.889)}
    for res, r in ((a, 0.5), (b, 0.889), (c, 0.5)):
        assert gap(top(res), refs[r]) <= LOGPROB_TOL, r
    # the two ratios' references differ on the compared ids: a reuse would be seen
    assert gap(top(b), refs[0.5]) > CONTROL_FACTOR * LOGPROB_TOL
    assert d.usage.prompt_tokens < a.usage.prompt_tokens  # lrcp drops at the input


def test_alvts_refused_per_request_where_not_enabled(tp_server: VLLMServer) -> None:
    """The session's LRCP server does not name alvts: a 400 naming the field, then it serves."""
    r = requests.post(tp_server.base_url + "/v1/chat/completions", json={
        "model": tp_server.model, "max_tokens": 1, "prune_method": "alvts",
        "messages": [{"role": "user", "content": "hi"}]}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prune_method"
    assert "not enabled on this server" in err["message"]
    assert chat(tp_server, images("qwen", 1)).usage.prompt_tokens > 0


def _image_spans(model_dir: Path, media: list[Any], text: str) -> list[tuple[int, int]]:
    """[start, end) of each image's placeholder tokens in the prompt vLLM gets (the same chat
    template and processor as the reference's)."""
    from vllm_tokenprune.preview._extract import prepare

    prep = prepare(str(model_dir), media, text)
    ids = prep.inputs["input_ids"][0].tolist()
    token = next(int(getattr(prep.model.config, k)) for k in (
        "image_token_id", "image_token_index") if getattr(prep.model.config, k, None) is not None)
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return [*spans, (len(ids), len(ids))]  # the last: the prompt's length


def _expected_hit(spans: list[tuple[int, int]], n: int) -> int:
    """The prefix-cache hit of a prompt of ``n`` tokens whose blocks are all cached: vLLM's
    (whole blocks, never the last token), cut back to the block before an image it would end
    inside or at (``alvts/scheduler.py``)."""
    hit = (n - 1) // BLOCK * BLOCK
    for start, end in spans:
        if 0 < hit and start <= hit < end:
            cut = start - start % BLOCK
            return cut - BLOCK if cut == start and cut > 0 else cut
    return hit


def test_a_prefix_cache_hit_inside_an_image_recomputes_the_image(servers: dict[str, Any]
                                                                  ) -> None:
    """The same two-image request twice: vLLM's hit (whole blocks, never the last token)
    would end inside the second image; it is cut back to the block before that image, the
    image is computed whole and routed (no partial item), and the answer is the first's and
    the reference's. Then another ratio: the images' blocks are not reused."""
    server, qwen_dir = servers["qwen"], servers["qwen_dir"]
    media = images("qwen", 71, 72)
    for j in range(16):  # a text whose prompt length puts vLLM's hit inside the second image
        text = PROMPT + " Be brief." * j
        *spans, (n, _) = _image_spans(qwen_dir, media, text)
        hit = (n - 1) // BLOCK * BLOCK
        inside = [s for s, e in spans[1:] if s < hit < e]
        if inside:
            break
    else:
        pytest.fail("no prompt puts the hit inside the second image")
    extra = {"prune_method": "alvts", "prune_ratio": 0.5}
    first = chat(server, media, text=text, **extra)
    before = partial_items(server)
    again = chat(server, media, text=text, **extra)
    assert cached(again) == _expected_hit(spans, n) == inside[0] - inside[0] % BLOCK < hit
    assert partial_items(server) == before == 0
    assert top(again) == pytest.approx(top(first), abs=BATCH_TOL)
    ref, _ = reference(qwen_dir, "qwen", media, 0.5, text)
    assert gap(top(again), ref) <= LOGPROB_TOL
    other = chat(server, media, text=text, prune_method="alvts", prune_ratio=0.889)
    assert cached(other) <= spans[0][0] < spans[0][1] <= cached(again)  # no image block reused


def test_a_second_chat_turn_hits_the_prefix_cache_and_equals_a_cold_one(
        servers: dict[str, Any]) -> None:
    """Turn 2 of a conversation about a routed image reads turn 1's blocks (the image's
    included) and gives the logprobs of the same turn with a cold cache (``cache_salt``: no
    block is shared); the skipped token-layers are counted only where the image is computed."""
    server = servers["qwen"]
    media = images("qwen", 81)
    extra = {"prune_method": "alvts", "prune_ratio": 0.889}
    turn1 = chat(server, media, max_tokens=4, **extra)
    answer = turn1.choices[0].message.content or ""
    messages = [*media_messages(media, PROMPT), {"role": "assistant", "content": answer},
                {"role": "user", "content": "And what else?"}]

    def turn2(**more: Any) -> Any:
        return server.openai().chat.completions.create(
            model=server.model, messages=messages, max_tokens=3, temperature=0.0,
            logprobs=True, top_logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, **extra, **more})

    skipped = scrape_skipped(server)
    warm = turn2()
    n = 48
    assert cached(warm) >= turn1.usage.prompt_tokens // BLOCK * BLOCK > n
    assert scrape_skipped(server) == skipped  # the image came from the cache: not routed now
    cold = turn2(cache_salt="cold-turn-2")
    assert cached(cold) == 0
    assert scrape_skipped(server) - skipped == (n - num_kept(n, 0.889)) * 2
    assert tokens(warm) == tokens(cold)
    for step in range(len(tokens(warm))):
        assert top(warm, step) == pytest.approx(top(cold, step), abs=BATCH_TOL)
