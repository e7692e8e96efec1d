"""Pruning rows in client-supplied precomputed features (``POST /inference/v1/generate``):
held to exactly what the server's own processor produces (:mod:`vllm_tokenprune.features`).

vLLM's real TokenPrune Qwen2.5-VL processor (tiny model, no server) renders an item; the item
goes through vLLM's own serialization (the ``kwargs_data`` strings of ``features``) and passes;
each tampered copy is refused naming its row. The route itself is exercised on a real server in
``tests/test_hardening_server.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.features import SuppliedRowError, check_supplied_items
from vllm_tokenprune.models.wire import METHOD_IDS, params_key, text_key
from vllm_tokenprune.testing.media import make_image

PARAMS = "features.kwargs_data.image[0].image_prune_params"
TEXT = "features.kwargs_data.image[0].image_prune_text_ids"


@pytest.fixture(scope="module")
def rendered(tiny_qwen_vllm_config: Any) -> tuple[Any, Any, Any]:
    """(processor, an lrcp item at 0.5, a resprune item at 0.5 with its text ids)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.processor import ProcessorInputs

    proc = MULTIMODAL_REGISTRY.create_processor(tiny_qwen_vllm_config.model_config)
    tok = proc.info.get_tokenizer()
    prompt = tok.encode("<|vision_start|><|image_pad|><|vision_end|>Describe.",
                        add_special_tokens=False)
    items = []
    for kwargs in ({}, {"prune_method": "resprune"}):
        out = proc.apply(ProcessorInputs(
            prompt=prompt, mm_data_items=proc.info.parse_mm_data(
                {"image": [make_image(112, 84, seed=71)]}),
            hf_processor_mm_kwargs=kwargs), TimingContext())
        items.append(out["mm_kwargs"]["image"][0])
    return proc, items[0], items[1]


def _with(item: Any, key: str, data: Any) -> Any:
    from vllm.multimodal.inputs import MultiModalKwargsItem

    return MultiModalKwargsItem({**item, key: dataclasses.replace(item[key], data=data)})


def _without(item: Any, key: str) -> Any:
    from vllm.multimodal.inputs import MultiModalKwargsItem

    return MultiModalKwargsItem({k: v for k, v in item.items() if k != key})


def _refused(proc: Any, item: Any, param: str, needle: str) -> None:
    with pytest.raises(SuppliedRowError) as e:
        check_supplied_items(proc, {"image": [item]})
    assert e.value.param == param, str(e.value)
    assert needle in str(e.value), str(e.value)


def test_rendered_items_pass_through_vllms_serialization(rendered):
    from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import (
        decode_mm_kwargs_item,
        encode_mm_kwargs_item,
    )

    proc, lrcp, resprune = rendered
    assert text_key("image") in resprune and text_key("image") not in lrcp
    for item in (lrcp, resprune):
        check_supplied_items(proc, {"image": [decode_mm_kwargs_item(encode_mm_kwargs_item(item))]})
    check_supplied_items(proc, {"image": [None, _without(lrcp, params_key("image"))]})


def test_tampered_params_rows_are_refused_naming_the_row(rendered):
    proc, lrcp, _ = rendered
    row = lrcp[params_key("image")].data
    n = int(row[2])

    def tampered(**cols: int) -> torch.Tensor:
        new = row.clone()
        for i, v in cols.items():
            new[int(i.removeprefix("c"))] = v
        return new

    _refused(proc, _with(lrcp, params_key("image"), tampered(c1=99)), PARAMS, "unknown method id")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c1=METHOD_IDS["alvts"])), PARAMS,
             "not allowed")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c0=n + 1)), PARAMS, "keeps")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c0=0)), PARAMS, "keeps")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c0=-5)), PARAMS, "keeps")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c2=n * 4)), PARAMS, "own layout")
    _refused(proc, _with(lrcp, params_key("image"), tampered(c4=int(row[4]) + 1)), PARAMS,
             "own layout")
    _refused(proc, _with(lrcp, params_key("image"), row.float()), PARAMS, "integer tensor")
    _refused(proc, _with(lrcp, params_key("image"), row[:3]), PARAMS, "integer tensor")
    _refused(proc, _with(lrcp, params_key("image"), torch.cat([row, row[:1]])), PARAMS,
             "own layout")
    # every keep-count a ratio in [0, 1) gives passes
    for k in range(1, n + 1):
        check_supplied_items(proc, {"image": [_with(lrcp, params_key("image"), tampered(c0=k))]})


def test_greedy_cap_and_text_ids(rendered, tiny_qwen_vllm_config):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    proc, _, resprune = rendered
    capped = MULTIMODAL_REGISTRY.create_processor(tiny_qwen_vllm_config.model_config)
    capped._tp_cfg = TokenPruneConfig(max_greedy_keep=2)
    _refused(capped, resprune, PARAMS, "max_greedy_keep")
    ids = resprune[text_key("image")].data
    vocab = int(proc.info.get_hf_config().get_text_config().vocab_size)
    bad = ids.clone()
    bad[0] = vocab
    _refused(proc, _with(resprune, text_key("image"), bad), TEXT, "outside")
    bad[0] = -2
    _refused(proc, _with(resprune, text_key("image"), bad), TEXT, "outside")
    _refused(proc, _with(resprune, text_key("image"), ids[:5]), TEXT, "integer tensor")
    _refused(proc, _without(resprune, params_key("image")), TEXT, "without")
