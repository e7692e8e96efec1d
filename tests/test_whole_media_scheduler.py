"""The WholeMedia schedulers (vllm_tokenprune/alvts/scheduler.py) as vLLM's engine core drives them,
sync and async: vLLM's real ``Scheduler`` / ``AsyncScheduler`` machinery (KV cache manager,
encoder cache manager, ``--disable-chunked-mm-input``), requests with two images each, a small
token budget so prompts are chunked, and model outputs fed back one step late for the async
classes (what async scheduling does: step N+1 is scheduled before step N's output arrives).

Async scheduling changes when decode steps are scheduled (output placeholders), not how a
prefill chunk is cut: ``AsyncScheduler`` inherits ``_try_schedule_encoder_inputs``, which
``WholeMediaMixin`` wraps, so the same rule holds in both modes. Checked here: no item is ever
split across steps by either WholeMedia class, every request completes, while vLLM's own
``AsyncScheduler`` splits an item under the same load (the rule is needed there too); a large
image behind a stream of small requests is scheduled within ``MAX_DEFERRALS + 1`` steps (and
waits until the small ones finish without the bound); a prefix-cache hit that would end inside
an item is cut back to a block boundary before it (vLLM's real KV cache manager and block
hashes), while vLLM's own scheduler resumes inside the item.
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts import scheduler as whole_media
from vllm_tokenprune.alvts.scheduler import (
    WholeMediaAsyncScheduler,
    WholeMediaScheduler,
    media_cache_cut,
)

IMAGE_TOKEN = 151655
#: the step budget: the largest image the tiny model allows (256 tokens), so prompts of two
#: images are chunked
BUDGET = 256


@pytest.fixture(scope="module")
def vllm_config(tiny_qwen_dir: Path) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=str(tiny_qwen_dir), enforce_eager=True, max_model_len=2048,
                     max_num_batched_tokens=BUDGET, max_num_seqs=8,
                     limit_mm_per_prompt={"image": 2, "video": 0},
                     enable_prefix_caching=False,
                     disable_chunked_mm_input=True).create_engine_config()
    cfg.cache_config.num_gpu_blocks = 1000
    return cfg


def _scheduler(cls: type, vllm_config: Any) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=1000, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return cls(vllm_config=vllm_config, kv_cache_config=kv,
               structured_output_manager=StructuredOutputManager(vllm_config), block_size=16)


def _request(rid: str, parts: list[int | str], max_tokens: int = 3, hasher: Any = None) -> Any:
    """A request of text runs (an int: that many tokens) and images (a str ``"<id>:<n>"``: an
    item of n placeholder tokens)."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    ids: list[int] = []
    features = []
    for part in parts:
        if isinstance(part, int):
            ids += [1 + len(ids) % 7] * part
            continue
        ident, n = part.split(":")
        features.append(MultiModalFeatureSpec(
            data=None, modality="image", identifier=ident, mm_hash=ident,
            mm_position=PlaceholderRange(offset=len(ids), length=int(n))))
        ids += [IMAGE_TOKEN] * int(n)
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                   mm_features=features, block_hasher=hasher)


def _run(cls: type, vllm_config: Any, delay: int) -> tuple[dict[str, list[int]], list[Any]]:
    """Six requests of two images each through ``cls``; each step's output is fed back
    ``delay`` steps later. Returns every request's scheduled chunk sizes and the requests."""
    sched = _scheduler(cls, vllm_config)
    requests = []
    for i in range(6):
        parts: list[int | str] = [3 + i]
        for j in range(2):
            parts += [f"img-{i}-{j}:{53 + 11 * ((i + j) % 4)}", 10 + i]
        req = _request(f"r{i}", parts)
        requests.append(req)
        sched.add_request(req)
    chunks, _ = _drive(sched, delay)
    assert not sched.has_requests(), "the requests did not complete"
    return dict(chunks), requests


def _drive(sched: Any, delay: int, steps: int = 100,
           arrivals: Any = None) -> tuple[dict[str, list[int]], list[dict[str, int]]]:
    """Run ``sched`` for up to ``steps`` steps (``arrivals(step)`` adds requests before a
    step), feeding each step's output back ``delay`` steps later (one sampled token per
    request whose prompt is done). Returns each request's chunk sizes and each step's
    scheduled tokens."""
    from vllm.v1.outputs import ModelRunnerOutput

    chunks: dict[str, list[int]] = defaultdict(list)
    per_step: list[dict[str, int]] = []
    pending: deque[tuple[Any, dict[str, bool]]] = deque()
    for step in range(steps):
        if arrivals is not None:
            for req in arrivals(step):
                sched.add_request(req)
        if not sched.has_requests() and not pending:
            break
        out = sched.schedule()
        per_step.append(dict(out.num_scheduled_tokens))
        if out.num_scheduled_tokens:
            done = {}
            for rid, n in out.num_scheduled_tokens.items():
                chunks[rid].append(n)
                done[rid] = sum(chunks[rid]) >= sched.requests[rid].num_prompt_tokens
            pending.append((out, done))
        if pending and (len(pending) > delay or not out.num_scheduled_tokens):
            old, done = pending.popleft()
            ids = list(old.num_scheduled_tokens)
            sched.update_from_output(old, ModelRunnerOutput(
                req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                sampled_token_ids=[[7] if done[r] else [] for r in ids]))
    return chunks, per_step


def _split_items(chunks: dict[str, list[int]], requests: list[Any]) -> list[tuple[str, int]]:
    split = []
    for req in requests:
        ends, at = set(), 0
        for n in chunks[req.request_id]:
            at += n
            ends.add(at)
        for f in req.mm_features:
            start, length = f.mm_position.offset, f.mm_position.length
            if any(start < e < start + length for e in ends):
                split.append((req.request_id, start))
    return split


@pytest.mark.parametrize("cls,delay", [(WholeMediaScheduler, 0), (WholeMediaAsyncScheduler, 1)])
def test_whole_media_schedulers_never_split_an_item(vllm_config, cls, delay):
    chunks, requests = _run(cls, vllm_config, delay)
    assert _split_items(chunks, requests) == []
    for req in requests:  # every prompt was scheduled whole, then decoded
        assert sum(chunks[req.request_id]) == len(req.prompt_token_ids) + 2


def test_vllms_async_scheduler_splits_an_item_under_the_same_load(vllm_config):
    """The control: vLLM's own AsyncScheduler (``--disable-chunked-mm-input`` alone) splits an
    item that starts exactly where a step ended; the async WholeMedia class is needed."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    chunks, requests = _run(AsyncScheduler, vllm_config, 1)
    assert _split_items(chunks, requests), chunks


def _wait_of_large_image(cls: type, vllm_config: Any, delay: int) -> int:
    """Steps a 250-token image waits after its request's text before it (its first step) was
    scheduled, while seven older requests decode ahead of it (the step's budget, 256, then
    leaves 249 tokens) and a small request arrives every step."""
    sched = _scheduler(cls, vllm_config)
    small = [_request(f"s{i}", [4], max_tokens=60) for i in range(7)]
    big = _request("big", [3, "big:250", 5])

    def arrivals(step: int) -> list[Any]:
        return small if step == 0 else [big] if step == 2 else \
            [_request(f"n{step}", [4], max_tokens=2)]

    _, per_step = _drive(sched, delay, steps=90, arrivals=arrivals)
    steps = [i for i, s in enumerate(per_step) if "big" in s]
    assert steps and per_step[steps[0]]["big"] == 3  # the text before the image
    item = next((i for i in steps[1:] if per_step[i]["big"] >= 250), None)
    assert item is not None, "the image was never scheduled"
    return item - steps[0]


@pytest.mark.parametrize("cls,delay", [(WholeMediaScheduler, 0), (WholeMediaAsyncScheduler, 1)])
def test_a_large_image_is_not_starved_by_small_requests(vllm_config, monkeypatch, cls, delay):
    bound = whole_media.MAX_DEFERRALS + 1 + delay
    assert _wait_of_large_image(cls, vllm_config, delay) <= bound
    # the control: without the bound it waits for the older requests' 60 decode steps
    monkeypatch.setattr(whole_media, "MAX_DEFERRALS", 10**6)
    assert _wait_of_large_image(cls, vllm_config, delay) > 50


@pytest.fixture(scope="module")
def cached_config(tiny_qwen_dir: Path) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=str(tiny_qwen_dir), enforce_eager=True, max_model_len=2048,
                     max_num_batched_tokens=BUDGET, max_num_seqs=8,
                     limit_mm_per_prompt={"image": 2, "video": 0},
                     enable_prefix_caching=True,
                     disable_chunked_mm_input=True).create_engine_config()
    cfg.cache_config.num_gpu_blocks = 1000
    return cfg


@pytest.mark.parametrize("cls,resumes_at", [
    (WholeMediaScheduler, 16),  # the hit is cut back to the block boundary before the item
    (None, 112),  # vLLM's own: the hit ends inside the item (resumes there)
])
def test_a_prefix_cache_hit_never_ends_inside_an_item(cached_config, cls, resumes_at):
    """The same prompt (20 text tokens, a 100-token image, 2 tokens) twice: the second is a
    prefix-cache hit of 7 blocks (112 tokens, the last token is always recomputed), which ends
    inside the image (tokens 20-119)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler

    init_none_hash(sha256)
    sched = _scheduler(cls or VllmScheduler, cached_config)
    hasher = get_request_block_hasher(16, sha256)
    first = _request("first", [20, "img:100", 2], max_tokens=1, hasher=hasher)
    sched.add_request(first)
    _drive(sched, 0)
    second = _request("second", [20, "img:100", 2], max_tokens=1, hasher=hasher)
    sched.add_request(second)
    out = sched.schedule()
    assert second.num_computed_tokens - out.num_scheduled_tokens["second"] == resumes_at
    assert out.num_scheduled_tokens["second"] == 122 - resumes_at


@pytest.mark.parametrize("cached,expected", [
    (0, 0),      # no hit
    (32, 32),    # ends in text before the first item (40-89)
    (64, 32),    # ends inside it: back to the block at or before its start
    (96, 96),    # ends in text between the items
    (128, 96),   # ends exactly at the second item's start (128-199): one block before it
    (160, 96),   # ends inside the second item
    (224, 224),  # after both
])
def test_media_cache_cut(cached: int, expected: int) -> None:
    from types import SimpleNamespace

    items = [SimpleNamespace(mm_position=SimpleNamespace(offset=o, length=n))
             for o, n in ((40, 50), (128, 72))]
    assert media_cache_cut(items, cached, 32) == expected
