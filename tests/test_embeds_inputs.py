"""Precomputed embedding inputs (``image_embeds``): the Qwen-VL families prune them (their
embedding input carries ``image_grid_thw``); LLaVA and LLaVA-NeXT serve them unpruned, so a
non-zero ratio for them is refused with an error naming the field, not ignored. The items come
from vLLM's own data parser; the processors are the plugin's real classes (not built by vLLM:
only the check runs)."""

from __future__ import annotations

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
def test_qwen_families_prune_embeddings(cls):
    assert cls.tp_prunes_embeds
    _proc(cls)._tp_check_embeds(_items(embeds=True), {"prune_ratio": 0.5})
