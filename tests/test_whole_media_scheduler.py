"""The WholeMedia schedulers (vllm_tokenprune/alvts/scheduler.py) as vLLM's engine core drives them,
sync and async: vLLM's real ``Scheduler`` / ``AsyncScheduler`` machinery (KV cache manager,
encoder cache manager, ``--disable-chunked-mm-input``), requests with two images each, a small
token budget so prompts are chunked, and model outputs fed back one step late for the async
classes (what async scheduling does: step N+1 is scheduled before step N's output arrives).

Async scheduling changes when decode steps are scheduled (output placeholders), not how a
prefill chunk is cut: ``AsyncScheduler`` inherits ``_try_schedule_encoder_inputs``, which
``WholeMediaMixin`` wraps, so the same rule holds in both modes. Checked here: no item is ever
split across steps by either WholeMedia class, every request completes, while vLLM's own
``AsyncScheduler`` splits an item under the same load (the rule is needed there too).
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts.scheduler import WholeMediaAsyncScheduler, WholeMediaScheduler

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


def _run(cls: type, vllm_config: Any, delay: int) -> tuple[dict[str, list[int]], list[Any]]:
    """Six requests of two images each through ``cls``; each step's output is fed back
    ``delay`` steps later. Returns every request's scheduled chunk sizes and the requests."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=1000, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    sched = cls(vllm_config=vllm_config, kv_cache_config=kv,
                structured_output_manager=StructuredOutputManager(vllm_config), block_size=16)
    requests = []
    for i in range(6):
        ids = [1] * (3 + i)
        features = []
        for j in range(2):
            n = 53 + 11 * ((i + j) % 4)
            features.append(MultiModalFeatureSpec(
                data=None, modality="image", identifier=f"img-{i}-{j}",
                mm_position=PlaceholderRange(offset=len(ids), length=n)))
            ids += [IMAGE_TOKEN] * n + [1] * (10 + i)
        req = Request(f"r{i}", ids, SamplingParams(max_tokens=3, ignore_eos=True), None,
                      mm_features=features)
        requests.append(req)
        sched.add_request(req)
    chunks: dict[str, list[int]] = defaultdict(list)
    pending: deque[tuple[Any, dict[str, bool]]] = deque()
    for _ in range(100):
        if not sched.has_requests() and not pending:
            break
        out = sched.schedule()
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
    assert not sched.has_requests(), "the requests did not complete"
    return dict(chunks), requests


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
