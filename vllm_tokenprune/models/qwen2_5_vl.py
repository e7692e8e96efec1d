"""``TokenPruneQwen2_5_VLForConditionalGeneration``: Qwen2.5-VL with visual-token pruning.

Only what differs from the shared machinery in :mod:`._mixin` lives here: where an item's token
grid comes from (``<modality>_grid_thw`` divided by the spatial merge size), how video time
steps are scaled (``second_per_grid_ts * tokens_per_second``), and which token ids delimit media.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.models._mixin import (
    TokenPruneModelMixin,
    TokenPruneProcessorMixin,
    mrope_positions_for_pruned_prompt,
    params_key,
    text_key,
)


class TokenPruneQwen2_5_VLMultiModalProcessor(
    TokenPruneProcessorMixin, Qwen2_5_VLMultiModalProcessor
):
    def _tp_grid(self, modality: str, item_grid: torch.Tensor) -> tuple[int, int, int]:
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        t, h, w = (int(x) for x in item_grid)
        return t, h // merge, w // merge


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenPruneQwen2_5_VLForConditionalGeneration(
    TokenPruneModelMixin, Qwen2_5_VLForConditionalGeneration
):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tp_setup(vllm_config)

    def _llm_grid(self, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        merge = self.config.vision_config.spatial_merge_size
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]

    def embed_multimodal(self, **kwargs: object) -> Any:
        mm_inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, mm_input in mm_inputs.items():
            if mm_input is None:
                continue
            if modality == "image":
                embeds = self._process_image_input(mm_input)
                grids = self._llm_grid(mm_input["image_grid_thw"])
                t_factors = [1.0] * len(grids)
            else:
                embeds = self._process_video_input(mm_input)
                grids = self._llm_grid(mm_input["video_grid_thw"])
                tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
                seconds = mm_input.get("second_per_grid_ts")
                secs = [1.0] * len(grids) if seconds is None else seconds.tolist()
                t_factors = [float(s) * tps for s in secs]
            out += self._tp_prune(
                modality,
                embeds,
                grids,
                t_factors,
                kwargs.get(params_key(modality)),  # type: ignore[arg-type]
                kwargs.get(text_key(modality)),  # type: ignore[arg-type]
            )
        return out

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        media = []
        grids = self.iter_mm_grid_thw(mm_features)
        for feature, (offset, t, h, w, t_factor) in zip(
            sorted(mm_features, key=lambda f: f.mm_position.offset), grids
        ):
            media.append((offset, feature.mm_position.length, t, h, w, t_factor))
        return mrope_positions_for_pruned_prompt(input_tokens, media)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        return self._tp_recompute_mrope_positions(
            input_ids,
            multimodal_embeddings,
            mrope_positions,
            num_computed_tokens,
            media_token_ids=(self.config.image_token_id, self.config.video_token_id),
        )
