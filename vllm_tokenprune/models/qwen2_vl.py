"""``TokenPruneQwen2VLForConditionalGeneration``: Qwen2-VL with visual-token pruning (a family
module: the processor side runs in the API server, the model side in the worker).

The Qwen-VL family's integration (:mod:`._qwen`) as is. What differs from Qwen2.5-VL is all on
vLLM's side: Qwen2-VL's processor gives no ``second_per_grid_ts``, so video time steps are the
frame-pair index itself (as in transformers' and vLLM's Qwen2-VL), and vLLM's Qwen2-VL does not
implement ``SupportsMultiModalPruning``: the family mixin declares it, so the model runner
hands prefill rows to our ``recompute_mrope_positions``.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.alvts.model import AlvtsModelMixin
from vllm_tokenprune.models._qwen import (
    TokenPruneQwenVLModelMixin,
    TokenPruneQwenVLProcessorMixin,
)


class TokenPruneQwen2VLMultiModalProcessor(
    TokenPruneQwenVLProcessorMixin, Qwen2VLMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class TokenPruneQwen2VLForConditionalGeneration(
    AlvtsModelMixin, TokenPruneQwenVLModelMixin, Qwen2VLForConditionalGeneration
):
    """Qwen2 language model: ``alvts`` routes its decoder layers."""
