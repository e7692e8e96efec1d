"""Worker safety on a real CPU server (docs/worker-safety.md): vision-tower calls stay within the
profiled encoder budget when many pruned images arrive at once; a scorer failure inside the
worker falls back, is counted on /metrics, and the server keeps serving; pruned images keep
their cache keys across chat turns, so turn 2 hits the prefix cache.

The session's hardened server (tests/_hard_server.py, shared with
tests/test_hardening_server.py: tiny Qwen2.5-VL, images only, float32) has the test-only hooks of
:mod:`vllm_tokenprune.models.faults` switched on: a log of the unpruned token counts of every
encoder batch, every planned vision-tower call and every input the tower module received (its
forward pre-hook), the pixel bytes staged per call, NaN scorer features for items of exactly
``NAN_TOKENS`` tokens, and one failure per worker failure site (``FAULTS``), each keyed on a row
count no other test on that server produces. Its ``min_keep`` (8) and ``max_greedy_keep`` (150)
change none of the counts here (every kept count is above 8, every greedy one at most 128).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests._hard_server import BIG, BIG_TOKENS, FAULTS, NAN_SIZE, NAN_TOKENS, PROFILED
from vllm_tokenprune import num_kept
from vllm_tokenprune.testing.media import (
    chat_messages,
    image_part,
    make_image,
    qwen_image_tokens,
)
from vllm_tokenprune.testing.server import VLLMServer

pytestmark = pytest.mark.server

#: Pixel values per LM token of this model: 2x2 patches of 3 channels x 2 frames x 14 x 14.
PIXELS_PER_TOKEN = 4 * 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def safety_server(hard_server: tuple[VLLMServer, Path]) -> tuple[VLLMServer, Path]:
    """(the session's hardened server, its encoder-call log)."""
    return hard_server


def chat(server: VLLMServer, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return server.openai().chat.completions.create(
        model=server.model, messages=messages, max_tokens=4, temperature=0.0,
        extra_body=extra or None)


def encoder_log(log: Path) -> list[tuple[str, int, int]]:
    if not log.exists():
        return []
    return [(k, int(n), int(c)) for k, n, c in
            (line.split() for line in log.read_text().splitlines() if line.strip())]


#: Bursts of 16 requests sent until one encoder step held more than the profiled batch.
MAX_BURSTS = 4


def test_vision_tower_calls_stay_within_profiled_budget(safety_server):
    """16 requests, each with a different 256-token image pruned to 26 tokens, at once: the
    scheduler charges 26 per image against a 512-token encoder budget, so one encoder step
    holds far more than the 2 images (512 tokens) vLLM profiled; the hook splits it. Whether
    the images reach one step together depends on how fast the API server prepares them (under
    load they can arrive one or two per step, and the guard has nothing to do: seen in about
    one suite run in three): another burst of new images is sent, up to :data:`MAX_BURSTS`,
    until a step brought more than the profiled batch; every burst is checked."""
    server, log = safety_server
    before = len(encoder_log(log))
    ratio = 0.9

    def one(seed: int) -> int:
        msgs = chat_messages([make_image(*BIG, seed=seed)], "Describe this image.")
        return chat(server, msgs, prune_ratio=ratio).usage.prompt_tokens

    bursts = 0
    while bursts < MAX_BURSTS:
        # new images each burst (a cached image would not reach the tower)
        seeds = [100 + i if bursts == 0 else 1000 + 16 * bursts + i for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            prompt_tokens = list(pool.map(one, seeds))
        bursts += 1
        assert len(set(prompt_tokens)) == 1  # same layout, exact pruned count in every request
        if max(n for kind, n, _ in encoder_log(log)[before:] if kind == "batch") > PROFILED:
            break
    entries = encoder_log(log)[before:]
    # what the vision tower module itself received (its forward pre-hook), not the plan
    tower = [n for kind, n, _ in entries if kind == "tower"]
    calls = [n for kind, n, _ in entries if kind == "call"]
    batches = [n for kind, n, _ in entries if kind == "batch"]
    staged = [n for kind, n, _ in entries if kind == "stage"]
    caps = {c for kind, _, c in entries if kind != "stage"}
    assert caps == {PROFILED}, caps
    assert sum(tower) == bursts * 16 * BIG_TOKENS  # every image through the tower exactly once
    assert max(tower) <= PROFILED, tower
    assert tower == calls  # the tower got exactly the sub-batches the guard planned
    # the guard had work to do: some scheduler step brought more than the profiled batch
    assert max(batches) > PROFILED, batches
    assert num_kept(BIG_TOKENS, ratio) == 26
    # each tower call had exactly its own pixels moved to the device, just before it (uint8
    # where vLLM normalizes on the device, mm_device_do_normalize; else float32)
    per_token = staged[0] // calls[0]
    assert per_token in (PIXELS_PER_TOKEN, 4 * PIXELS_PER_TOKEN)
    assert staged == [n * per_token for n in calls], (staged, calls)


def _fallbacks(server: VLLMServer) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r'^tokenprune_scorer_fallbacks_total\{([^}]*)\} ([0-9.e+]+)$', text,
                         re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[f'{labels["method"]}/{labels["reason"]}'] = float(m.group(2))
    return out


def test_nan_features_fall_back_and_the_server_keeps_serving(safety_server):
    """The NaN hook makes the scorer fail inside the worker for the 80-token image: that
    request is answered (its prompt still has exactly the kept count of placeholders), the
    fallback is counted on /metrics, and the next requests (the same image included) are
    served."""
    server, _ = safety_server
    before = _fallbacks(server).get("divprune/non_finite", 0.0)
    bad = make_image(*NAN_SIZE, seed=7)
    good = make_image(*BIG, seed=8)
    res = chat(server, chat_messages([bad, good], "Describe these images."),
               prune_ratio=0.5, prune_method="divprune")
    assert res.choices[0].finish_reason in ("length", "stop")
    plain = chat(server, chat_messages([bad, good], "Describe these images."), prune_ratio=0.0)
    saved = (NAN_TOKENS - num_kept(NAN_TOKENS, 0.5)) + (BIG_TOKENS - num_kept(BIG_TOKENS, 0.5))
    assert res.usage.prompt_tokens == plain.usage.prompt_tokens - saved
    after = _fallbacks(server)
    assert after.get("divprune/non_finite", 0.0) == before + 1, after
    # the server is alive and serves the next requests (another 80-token image: poisoned
    # too, so each falls back), with the exact pruned count, pruned with other methods too
    msgs = chat_messages([make_image(*NAN_SIZE, seed=9)], "Hi.")
    unpruned = chat(server, msgs, prune_ratio=0.0).usage.prompt_tokens
    for method in ("lrcp", "divprune"):
        again = chat(server, msgs, prune_ratio=0.25, prune_method=method)
        assert again.usage.prompt_tokens == \
            unpruned - (NAN_TOKENS - num_kept(NAN_TOKENS, 0.25)), method
    final = _fallbacks(server)
    assert final.get("lrcp/non_finite", 0.0) == after.get("lrcp/non_finite", 0.0) + 1, final
    assert final.get("divprune/non_finite", 0.0) == after["divprune/non_finite"] + 1, final
    assert requests.get(server.base_url + "/health", timeout=10).status_code == 200


def test_each_worker_failure_site_falls_back_and_the_server_keeps_serving(safety_server,
                                                                        tiny_qwen_dir):
    """Each failure site of the worker a request can reach (a params row the worker cannot
    read, encoder rows that do not match the processor's count, the M-RoPE position fill
    failing, the runner not recomputing positions), triggered on the server by its test hook:
    the request is answered with its exact prompt length, the fallback is counted under its
    reason, and the next request is served without one. (ALVTS's site needs the alvts server
    flags: tests/test_gpu_emulation_worker.py covers it in-process.)"""
    server, _ = safety_server
    for site, (size, tokens, reason) in FAULTS.items():
        image = make_image(*size, seed=11)
        assert qwen_image_tokens(tiny_qwen_dir, image) == tokens, site

        def reasons() -> dict[str, float]:
            out: dict[str, float] = {}
            for key, value in _fallbacks(server).items():
                out[key.split("/")[1]] = out.get(key.split("/")[1], 0.0) + value
            return out

        before = reasons()
        res = chat(server, chat_messages([image], "Describe this image."), prune_ratio=0.0)
        assert res.choices[0].finish_reason in ("length", "stop"), site
        assert res.usage.prompt_tokens > tokens
        after = reasons()
        assert after.get(reason, 0.0) >= before.get(reason, 0.0) + 1, (site, after)
        nxt = chat(server, chat_messages([make_image(*BIG, seed=12)], "Hi."), prune_ratio=0.5)
        assert nxt.usage.prompt_tokens > 0
        assert reasons().get(reason, 0.0) == after.get(reason, 0.0), site
    assert requests.get(server.base_url + "/health", timeout=10).status_code == 200


def _two_turns(server: VLLMServer, method: str, seed: int) -> tuple[Any, Any]:
    image = make_image(*BIG, seed=seed)
    turn1 = [{"role": "user", "content": [image_part(image),
                                          {"type": "text", "text": "What is in the picture?"}]}]
    first = chat(server, turn1, prune_ratio=0.5, prune_method=method)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And what colour is it?"}]
    second = chat(server, turn2, prune_ratio=0.5, prune_method=method)
    return first, second


@pytest.mark.parametrize("method", ["lrcp", "resprune"])
def test_second_chat_turn_reuses_the_first_turns_image(safety_server, method):
    """Turn 2 repeats turn 1 (its image included) and adds a question. The image's key does
    not change with the new turn, even for the text-conditioned ResPrune (its scorer text is
    the image's own message), so turn 2's prompt starts with cached blocks: the first block
    holds the image, which would miss if its key had changed."""
    server, _ = safety_server
    first, second = _two_turns(server, method, seed=300 if method == "lrcp" else 301)
    assert (first.usage.prompt_tokens_details.cached_tokens or 0) == 0
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    # the image's kept tokens start within the first 32 tokens, so any cached block covers it
    assert cached >= num_kept(BIG_TOKENS, 0.5), (cached, second.usage)
