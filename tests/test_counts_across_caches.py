"""The ``token_prune`` response field and the token counters are exact for items served from
vLLM's multimodal processor cache, whichever processor instance first processed the item.

vLLM's real processor (the TokenPrune Qwen2.5-VL one, built from the tiny model's config, no
server) runs with each kind of processor cache vLLM 0.32 has: none, processor-only (what every
API server process gets with ``--api-server-count > 1``), ``lru`` (the default with one API
server: a hit comes back without its data) and ``shm`` (``--mm-processor-cache-type shm``: every
item comes back as a shared-memory address). Two processor instances, A and B, share one cache,
as requests of two API servers would share one if vLLM shared it: B's hits on items A processed
must report the same counts as A did. (vLLM 0.32 gives each API server process its own cache;
this is the stricter case.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import DEFAULT_RATIO
from vllm_tokenprune import num_kept, response
from vllm_tokenprune.metrics import frontend as metrics
from vllm_tokenprune.testing.media import make_image, qwen_image_tokens


@pytest.fixture(scope="module")
def vllm_config(tiny_qwen_vllm_config: Any) -> Any:
    metrics.enable_frontend()
    return tiny_qwen_vllm_config


def _cache(kind: str, vllm_config: Any) -> Any:
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache
    from vllm.multimodal.cache.lru import LruKeyReplicatedSenderCache
    from vllm.multimodal.cache.shm import ShmObjectStoreSenderCache

    model_config = vllm_config.model_config
    return {"none": lambda: None,
            "processor_only": lambda: MultiModalProcessorOnlyCache(model_config),
            "lru": lambda: LruKeyReplicatedSenderCache(model_config),
            "shm": lambda: ShmObjectStoreSenderCache(vllm_config)}[kind]()


@pytest.fixture(params=["none", "processor_only", "lru", "shm"])
def two_processors(request: Any, vllm_config: Any) -> Iterator[tuple[Any, Any, Any]]:
    from vllm.multimodal import MULTIMODAL_REGISTRY

    cache = _cache(request.param, vllm_config)
    a = MULTIMODAL_REGISTRY.create_processor(vllm_config.model_config)
    b = MULTIMODAL_REGISTRY.create_processor(vllm_config.model_config)
    yield a, b, cache
    close = getattr(getattr(cache, "_shm_cache", None), "close", None)
    if close is not None:
        close()


def _counters(model: str) -> dict[str, float]:
    m = metrics._frontend
    assert m is not None
    return {name: m[name].labels(model, "lrcp", "image")._value.get()
            for name in ("input", "kept", "saved", "items")}


def _apply(processor: Any, cache: Any, images: list[Any], **kwargs: Any) -> dict[str, Any]:
    """One request through the processor, as vLLM's renderer runs it; its token_prune field."""
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.processor import ProcessorInputs

    tok = processor.info.get_tokenizer()
    text = "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + "Describe."
    inputs = ProcessorInputs(
        prompt=tok.encode(text, add_special_tokens=False),
        mm_data_items=processor.info.parse_mm_data({"image": images}),
        hf_processor_mm_kwargs=kwargs, cache=cache)
    details = response.RequestDetails()
    token = response._current.set(details)
    try:
        processor.apply(inputs, TimingContext())
    finally:
        response._current.reset(token)
    field = details.to_json()
    assert field is not None
    return field


def test_counts_are_exact_whichever_processor_saw_the_item(two_processors, tiny_qwen_dir,
                                                           vllm_config):
    a, b, cache = two_processors
    model = vllm_config.model_config.served_model_name
    x, y = make_image(112, 84, seed=61), make_image(140, 112, seed=62)
    n = {id(im): qwen_image_tokens(tiny_qwen_dir, im) for im in (x, y)}

    def expect(images: list[Any], ratio: float) -> list[dict[str, Any]]:
        return [{"modality": "image", "index": i, "tokens": n[id(im)],
                 "kept": num_kept(n[id(im)], ratio), "why": "ratio"}
                for i, im in enumerate(images)]

    plan = [  # (processor, images, ratio or None)
        (a, [x], None),        # A processes x
        (b, [x], None),        # B: x from the cache
        (b, [x, y], None),     # B: x from the cache, y new
        (a, [y, x], None),     # A: both from the cache (y first processed by B)
        (b, [x], 0.75),        # another ratio: another cache key, processed now
        (a, [x], 0.75),        # A: from the cache (processed by B)
    ]
    before = _counters(model)
    want = dict.fromkeys(before, 0.0)
    for processor, images, ratio in plan:
        kwargs = {} if ratio is None else {"prune_ratio": ratio}
        field = _apply(processor, cache, images, **kwargs)
        r = DEFAULT_RATIO if ratio is None else ratio
        assert field["items"] == expect(images, r), (processor is a, ratio)
        for item in field["items"]:
            want["input"] += item["tokens"]
            want["kept"] += item["kept"]
            want["saved"] += item["tokens"] - item["kept"]
            want["items"] += 1
    after = _counters(model)
    assert {k: after[k] - before[k] for k in after} == want
    if cache is not None:  # the plan did hit the cache
        assert cache.make_stats().hits >= 4
