"""Worker safety on a real CPU server (docs/worker-safety.md): vision-tower calls stay within the
profiled encoder budget when many pruned images arrive at once; a scorer failure inside the
worker falls back, is counted on /metrics, and the server keeps serving; pruned images keep
their cache keys across chat turns, so turn 2 hits the prefix cache.

One server (tiny Qwen2.5-VL, images only, float32) with the test-only hooks of
:mod:`vllm_tokenprune.models.faults` switched on: a log of the unpruned token counts of every
encoder batch, every planned vision-tower call and every input the tower module received (its
forward pre-hook), the pixel bytes staged per call, NaN scorer features for items of exactly
``NAN_TOKENS`` tokens, and one failure per worker failure site (``FAULTS``), each keyed on a row
count no other test here produces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import QWEN25_ARCH, _start
from vllm_tokenprune import num_kept
from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models.faults import ENCODER_LOG_ENV, FAULTS_ENV, NAN_TOKENS_ENV
from vllm_tokenprune.testing.media import (
    chat_messages,
    image_part,
    make_image,
    qwen_image_tokens,
)
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

pytestmark = pytest.mark.server

#: 448x448 -> a 16x16 token grid: 256 tokens, the largest image this server allows (the tiny
#: model's max_pixels), so the profiled encoder batch is 512 // 256 = 2 images = 512 tokens.
BIG = (448, 448)
BIG_TOKENS = 256
PROFILED = 512
#: Pixel values per LM token of this model: 2x2 patches of 3 channels x 2 frames x 14 x 14.
PIXELS_PER_TOKEN = 4 * 3 * 2 * 14 * 14
#: 280x224 -> 10x8 = 80 tokens: the size the NaN hook poisons.
NAN_SIZE = (280, 224)
NAN_TOKENS = 80
#: Worker failure sites (faults.FAULT_SITES) -> (image size, its tokens = the rows the site sees
#: at ratio 0, the fallback reason): counts between 128 and 256 that no other test's items or
#: prefill chunks here have.
FAULTS = {
    faults.FAULT_PARAMS: ((392, 336), 168, fallbacks.BAD_PARAMS),
    faults.FAULT_COUNT_MISMATCH: ((392, 364), 182, fallbacks.COUNT_MISMATCH),
    faults.FAULT_POSITIONS: ((392, 392), 196, fallbacks.POSITIONS),
    faults.FAULT_NO_RECOMPUTE: ((420, 392), 210, fallbacks.NO_RECOMPUTE),
}


@pytest.fixture(scope="module")
def safety_server(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[VLLMServer, Path]]:
    log = tmp_path_factory.mktemp("guard") / "encoder-calls.log"
    overrides = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=0.5)
    args = ["--dtype", "float32", "--max-num-batched-tokens", "512", "--seed", "0",
            "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
            "--enable-prompt-tokens-details", "--hf-overrides", overrides]
    import os

    old = {k: os.environ.get(k) for k in (ENCODER_LOG_ENV, NAN_TOKENS_ENV, FAULTS_ENV)}
    os.environ[ENCODER_LOG_ENV] = str(log)
    os.environ[NAN_TOKENS_ENV] = str(NAN_TOKENS)
    os.environ[FAULTS_ENV] = ",".join(f"{site}:{n}" for site, (_, n, _) in FAULTS.items())
    try:
        server = _start(tiny_qwen_dir, args, "worker_safety")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield server, log
    server.stop()


def chat(server: VLLMServer, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return server.openai().chat.completions.create(
        model=server.model, messages=messages, max_tokens=4, temperature=0.0,
        extra_body=extra or None)


def encoder_log(log: Path) -> list[tuple[str, int, int]]:
    if not log.exists():
        return []
    return [(k, int(n), int(c)) for k, n, c in
            (line.split() for line in log.read_text().splitlines() if line.strip())]


def test_vision_tower_calls_stay_within_profiled_budget(safety_server):
    """16 requests, each with a different 256-token image pruned to 26 tokens, at once: the
    scheduler charges 26 per image against a 512-token encoder budget, so one encoder step
    holds far more than the 2 images (512 tokens) vLLM profiled; the hook splits it."""
    server, log = safety_server
    before = len(encoder_log(log))
    ratio = 0.9

    def one(i: int) -> int:
        msgs = chat_messages([make_image(*BIG, seed=100 + i)], "Describe this image.")
        return chat(server, msgs, prune_ratio=ratio).usage.prompt_tokens

    with ThreadPoolExecutor(16) as pool:
        prompt_tokens = list(pool.map(one, range(16)))
    assert len(set(prompt_tokens)) == 1  # same layout, exact pruned count in every request
    entries = encoder_log(log)[before:]
    # what the vision tower module itself received (its forward pre-hook), not the plan
    tower = [n for kind, n, _ in entries if kind == "tower"]
    calls = [n for kind, n, _ in entries if kind == "call"]
    batches = [n for kind, n, _ in entries if kind == "batch"]
    staged = [n for kind, n, _ in entries if kind == "stage"]
    caps = {c for kind, _, c in entries if kind != "stage"}
    assert caps == {PROFILED}, caps
    assert sum(tower) == 16 * BIG_TOKENS  # every image went through the tower exactly once
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
