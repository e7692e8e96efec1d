"""``TokenPruneLlavaForConditionalGeneration``: LLaVA-1.5 with visual-token pruning (a family
module: the processor side runs in the API server, the model side in the worker).

LLaVA's LM uses 1-D RoPE, and every LLaVA pruning paper gives the kept tokens contiguous
positions: the pruned image is simply a shorter run of ``<image>`` placeholders, so there is no
position bookkeeping at all (``tp_mrope = False``). Each image has the vision tower's fixed
token count N (576 = 24x24 for CLIP ViT-L/336 with the CLS token dropped); the scorer sees the
projector output with the grid (1, 24, 24). The processor output has no ``*_grid_thw``: the
grid comes from the vision encoder's patch grid. Only CLIP/SigLIP towers (LLaVA-1.5 and its
relatives); Pixtral-HF checkpoints, which vLLM serves through the same architecture name, are
not supported by the pruned variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.alvts.model import AlvtsModelMixin
from vllm_tokenprune.models.model_hooks import TokenPruneModelMixin, rows_of
from vllm_tokenprune.models.processor import TokenPruneProcessorMixin
from vllm_tokenprune.models.wire import ItemLayout, params_key, text_key


class TokenPruneLlavaMultiModalProcessor(TokenPruneProcessorMixin, LlavaMultiModalProcessor):
    tp_prunes_embeds = False

    def _tp_item_layouts(self, modality: str, hf_out: Mapping[str, Any]) -> list[ItemLayout] | None:
        pixel_values = hf_out.get("pixel_values")
        if modality != "image" or pixel_values is None:
            return None
        encoder = self.info.get_vision_encoder_info()
        size = encoder.get_image_size()
        num_tokens = self.info.get_num_image_tokens(image_width=size, image_height=size)
        side = encoder.get_patch_grid_length()
        grid = (1, side, side) if num_tokens == side * side else None  # None: CLS kept
        return [ItemLayout(num_tokens, grid)] * len(pixel_values)


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneLlavaMultiModalProcessor,
    info=LlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenPruneLlavaForConditionalGeneration(AlvtsModelMixin, TokenPruneModelMixin,
                                              LlavaForConditionalGeneration):
    """A Llama language model: ``alvts`` routes its decoder layers."""

    tp_mrope = False

    def embed_multimodal(self, **kwargs: object) -> Any:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        params = kwargs.get(params_key("image"))
        text = kwargs.get(text_key("image"))

        def run(sub: Any, items: range) -> tuple[torch.Tensor, ...]:
            embeds = list(self._process_image_input(sub))
            return self._tp_keep_rows("image", embeds, rows_of(params, items),
                                      rows_of(text, items))

        if image_input["type"] != "pixel_values" or not isinstance(params, torch.Tensor):
            return run(self._tp_stage(image_input),
                       range(0, len(params) if params is not None else 0))
        charges = [self._tp_row_charge(r) for r in params.tolist()]
        return self._tp_encode_in_chunks(charges, image_input, None, run,
                                         profile=self._tp_is_profile(kwargs, "image"))
