"""``TokenPruneQwen2_5_VLForConditionalGeneration``: Qwen2.5-VL with visual-token pruning (a
family module: the processor side runs in the API server, the model side in the worker).

Everything is the Qwen-VL family's (:mod:`._qwen`): images and videos are pruned over their
whole (t, h, w) token grid, and video time steps scale by ``second_per_grid_ts *
tokens_per_second`` as in Qwen2.5-VL's M-RoPE. This module only binds the vLLM classes.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.alvts.model import AlvtsModelMixin
from vllm_tokenprune.models._qwen import (
    TokenPruneQwenVLModelMixin,
    TokenPruneQwenVLProcessorMixin,
)


class TokenPruneQwen2_5_VLMultiModalProcessor(
    TokenPruneQwenVLProcessorMixin, Qwen2_5_VLMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenPruneQwen2_5_VLForConditionalGeneration(
    AlvtsModelMixin, TokenPruneQwenVLModelMixin, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2 language model: ``alvts`` routes its decoder layers."""
