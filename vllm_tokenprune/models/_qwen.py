"""What the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) shares on top of the shared mixins
(a family module: the processor side runs in the API server, the model side in the worker).

Processor side: an item's LM token grid is its ``<modality>_grid_thw`` divided by the spatial
merge size. Model side: ``embed_multimodal`` runs the model's own vision tower per modality and
prunes with :meth:`TokenPruneModelMixin._tp_prune` (kept rows + their unpruned M-RoPE
positions); ``get_mrope_input_positions`` lays the pruned prompt's text out as if nothing was
pruned; ``recompute_mrope_positions`` gives the kept tokens their real positions. Video time
steps scale by ``second_per_grid_ts * tokens_per_second`` when the processor provides
``second_per_grid_ts`` (Qwen2.5-VL), exactly as vLLM's own ``iter_mm_grid_thw``; otherwise
(Qwen2-VL) by 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch

from vllm_tokenprune.models.model_hooks import TokenPruneModelMixin, rows_of
from vllm_tokenprune.models.positions import MediaSpan, mrope_positions_for_spans
from vllm_tokenprune.models.processor import TokenPruneProcessorMixin
from vllm_tokenprune.models.wire import Grid, params_key, text_key

Embeds = tuple[torch.Tensor, ...]


class TokenPruneQwenVLProcessorMixin(TokenPruneProcessorMixin):
    def _tp_grid(self, modality: str, item_grid: torch.Tensor) -> Grid:
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        t, h, w = (int(x) for x in item_grid)
        return t, h // merge, w // merge


class TokenPruneQwenVLModelMixin(TokenPruneModelMixin):
    """Model side of the Qwen-VL family (mix in before the vLLM model class)."""

    config: Any
    #: vLLM's model runner hands prefill media rows to ``recompute_mrope_positions`` only for
    #: models that declare this (vLLM's Qwen2-VL does not; Qwen2.5-VL and Qwen3-VL do).
    supports_multimodal_pruning: ClassVar[Literal[True]] = True

    def _llm_grid(self, grid_thw: torch.Tensor) -> list[Grid]:
        merge = self.config.vision_config.spatial_merge_size
        return [(int(t), int(h) // merge, int(w) // merge)
                for t, h, w in grid_thw.reshape(-1, 3).tolist()]

    def _tp_tokens_per_second(self) -> float:
        return float(getattr(self.config.vision_config, "tokens_per_second", 1.0))

    # -- encoder side
    def embed_multimodal(self, **kwargs: object) -> Any:
        mm_inputs = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        out: tuple[torch.Tensor, ...] = ()
        # vLLM's Qwen2-VL names the groups "images"/"videos", Qwen2.5/3-VL "image"/"video".
        for group, mm_input in mm_inputs.items():
            if mm_input is None:
                continue
            if group.startswith("image"):
                out += self._tp_embed_images(mm_input, kwargs)
            else:
                out += self._tp_embed_videos(mm_input, kwargs)
        return out

    def _tp_embed_images(self, mm_input: Any, kwargs: Mapping[str, object]) -> Embeds:
        params = kwargs.get(params_key("image"))
        text = kwargs.get(text_key("image"))

        def run(sub: Any, items: range) -> Embeds:
            embeds = self._process_image_input(sub)  # type: ignore[attr-defined]
            grids = self._llm_grid(sub["image_grid_thw"])
            return self._tp_prune("image", embeds, grids, [1.0] * len(grids),
                                  rows_of(params, items), rows_of(text, items))

        return self._tp_in_chunks(mm_input, "image", run, kwargs)

    def _tp_video_seconds(self, kwargs: Mapping[str, object], num: int) -> list[float]:
        seconds = kwargs.get("second_per_grid_ts")
        if isinstance(seconds, torch.Tensor):
            return [float(s) for s in seconds.reshape(-1).tolist()]
        if isinstance(seconds, (list, tuple)):
            return [float(torch.as_tensor(s).reshape(-1)[0]) for s in seconds]
        return [1.0] * num

    def _tp_embed_videos(self, mm_input: Any, kwargs: Mapping[str, object]) -> Embeds:
        params = kwargs.get(params_key("video"))
        text = kwargs.get(text_key("video"))
        tps = self._tp_tokens_per_second()
        secs = self._tp_video_seconds(kwargs, int(mm_input["video_grid_thw"].shape[0]))

        def run(sub: Any, items: range) -> Embeds:
            embeds = self._process_video_input(sub)  # type: ignore[attr-defined]
            grids = self._llm_grid(sub["video_grid_thw"])
            return self._tp_prune("video", embeds, grids, [secs[i] * tps for i in items],
                                  rows_of(params, items), rows_of(text, items))

        return self._tp_in_chunks(mm_input, "video", run, kwargs)

    def _tp_in_chunks(self, mm_input: Any, modality: str, run: Callable[[Any, range], Embeds],
                      kwargs: Mapping[str, object]) -> Embeds:
        """``run`` on sub-batches within the profiled encoder budget (pixel inputs only;
        precomputed embeddings do not go through the vision tower)."""
        grid_thw = mm_input[f"{modality}_grid_thw"]
        num = int(grid_thw.shape[0])
        if not str(mm_input["type"]).startswith("pixel_values"):
            return tuple(run(mm_input, range(num)))
        merge = self.config.vision_config.spatial_merge_size
        patches = grid_thw.prod(-1).tolist()
        charges = [int(p) // (merge * merge) for p in patches]
        key = "pixel_values" if modality == "image" else "pixel_values_videos"
        return self._tp_encode_in_chunks(charges, mm_input, {key: patches}, run,
                                         profile=self._tp_is_profile(kwargs, modality))

    def get_encoder_cudagraph_config(self) -> Any:
        """vLLM's config with no graph modality: every item must go through
        ``embed_multimodal`` (see :meth:`TokenPruneModelMixin._tp_disable_encoder_cudagraphs`;
        vLLM's own Qwen2-VL lists images and videos unconditionally)."""
        from dataclasses import replace

        return replace(super().get_encoder_cudagraph_config(),  # type: ignore[misc]
                       modalities=[])

    # -- positions
    def _tp_feature_span(self, feature: Any) -> MediaSpan:
        """The unpruned layout of one media item of a request (``MultiModalFeatureSpec``)."""
        data = feature.data
        modality = feature.modality
        (t, h, w), = self._llm_grid(data[f"{modality}_grid_thw"].data)
        t_factor = 1.0
        if modality == "video":
            elem = data.get("second_per_grid_ts")
            seconds = 1.0 if elem is None else float(torch.as_tensor(elem.data).reshape(-1)[0])
            t_factor = seconds * self._tp_tokens_per_second()
        pos = feature.mm_position
        return MediaSpan.of_grid(pos.offset, pos.length, t, h, w, t_factor)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        spans = [self._tp_feature_span(f)
                 for f in sorted(mm_features, key=lambda f: f.mm_position.offset)]
        return mrope_positions_for_spans(input_tokens, spans)

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
