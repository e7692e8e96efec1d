"""Precomputed embedding inputs (``image_embeds``): the Qwen-VL families prune them (their
embedding input carries ``image_grid_thw``); LLaVA and LLaVA-NeXT serve them unpruned, so a
non-zero ratio for them is refused with an error naming the field, not ignored. The items come
from vLLM's own data parser. The refusal checks run on the plugin's processor classes (not
built by vLLM: only the check runs); the Qwen2.5-VL pruning check runs the processor vLLM's
own registry builds for the tiny model, through its ``apply``."""

from __future__ import annotations

import json

import pytest
import torch
from vllm.multimodal.parse import MultiModalDataParser

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.models.llava import TokenPruneLlavaMultiModalProcessor
from vllm_tokenprune.models.llava_next import TokenPruneLlavaNextMultiModalProcessor
from vllm_tokenprune.models.qwen2_5_vl import TokenPruneQwen2_5_VLMultiModalProcessor
from vllm_tokenprune.models.qwen2_vl import TokenPruneQwen2VLMultiModalProcessor
from vllm_tokenprune.models.qwen3_vl import TokenPruneQwen3VLMultiModalProcessor

LLAVA = [TokenPruneLlavaMultiModalProcessor, TokenPruneLlavaNextMultiModalProcessor]
QWEN = [TokenPruneQwen2VLMultiModalProcessor, TokenPruneQwen2_5_VLMultiModalProcessor,
        TokenPruneQwen3VLMultiModalProcessor]


def _proc(cls, default_ratio: float = 0.0):
    proc = cls.__new__(cls)
    proc._tp_cfg = TokenPruneConfig(prune_ratio=default_ratio)
    return proc


def _items(embeds: bool):
    if embeds:
        data = {"image": torch.randn(2, 16, 32)}  # two images' precomputed embeddings
    else:
        from PIL import Image

        data = {"image": [Image.new("RGB", (32, 32))]}
    return MultiModalDataParser().parse_mm_data(data)


@pytest.mark.parametrize("cls", LLAVA, ids=lambda c: c.__name__)
def test_llava_families_refuse_a_ratio_for_embeddings(cls):
    with pytest.raises(ValueError, match=r"^prune_ratio: precomputed image embeddings"):
        _proc(cls)._tp_check_embeds(_items(embeds=True), {"prune_ratio": 0.5})
    with pytest.raises(ValueError, match=r"^prune_ratio:"):  # the server default counts too
        _proc(cls, default_ratio=0.5)._tp_check_embeds(_items(embeds=True), {})
    _proc(cls)._tp_check_embeds(_items(embeds=True), {"prune_ratio": 0.0})  # unpruned: fine
    _proc(cls)._tp_check_embeds(_items(embeds=False), {"prune_ratio": 0.5})  # pixels: pruned


@pytest.mark.parametrize("cls", QWEN, ids=lambda c: c.__name__)
def test_qwen_families_do_not_refuse_embeddings(cls):
    _proc(cls)._tp_check_embeds(_items(embeds=True), {"prune_ratio": 0.5})


def test_qwen_processor_prunes_an_embeddings_item(tiny_qwen_dir):
    """An ``image_embeds`` item (24 rows, grid 1 x 8 x 12 patches = 4 x 6 merged tokens)
    through the processor vLLM builds for TokenPrune Qwen2.5-VL: at ratio 0.5 its placeholder
    run is the kept count and the params row the worker prunes by says keep 12 of 24 on the
    (1, 4, 6) grid; at ratio 0 nothing changes."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from vllm_tokenprune import num_kept
    from vllm_tokenprune.models.wire import ItemParams
    from vllm_tokenprune.plugin import register
    from vllm_tokenprune.testing.server import token_prune_overrides

    register()
    overrides = json.loads(token_prune_overrides(
        "TokenPruneQwen2_5_VLForConditionalGeneration", method="lrcp", prune_ratio=0.0))
    config = ModelConfig(model=str(tiny_qwen_dir), hf_overrides=overrides, dtype="float32",
                         enable_mm_embeds=True)
    proc = MULTIMODAL_REGISTRY.create_processor(config)
    tok = proc.info.get_tokenizer()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = tok.encode("<|vision_start|><|image_pad|><|vision_end|>Describe.")
    items = proc.info.parse_mm_data({"image": {"image_embeds": torch.randn(24, 128),
                                               "image_grid_thw": torch.tensor([[1, 8, 12]])}})
    for ratio in (0.0, 0.5):
        out = proc.apply(ProcessorInputs(ids, items, hf_processor_mm_kwargs={
            "prune_ratio": ratio, "prune_method": "norm"}), TimingContext())
        kept = num_kept(24, ratio)
        assert out["prompt_token_ids"].count(pad) == kept
        (item,) = out["mm_kwargs"]["image"]
        params = ItemParams.from_row(item["image_prune_params"].data.tolist())
        assert (params.num_keep, params.num_tokens, params.grid) == (kept, 24, (1, 4, 6))
        if ratio:
            assert params.method == "norm"
