"""``TokenPruneQwen3VLForConditionalGeneration``: Qwen3-VL with visual-token pruning (a family
module: the processor side runs in the API server, the model side in the worker).

Two things differ from Qwen2/2.5-VL:

* **Deepstack.** Qwen3-VL's vision tower returns, for every visual token, the main embedding
  (what replaces the placeholder token) concatenated with one copy per deepstack level (added
  to the hidden states of the first LM layers). Each item's rows are selected as a whole, so
  every copy is pruned with the same selection; the scorer sees the main embedding only.
* **Video timestamps.** An unpruned video becomes, per frame, ``<t.t seconds>`` text, then
  ``<|vision_start|>``, the frame's h*w tokens, ``<|vision_end|>``; every frame sits at t = 0 of
  its own (1, h, w) grid, after the timestamp text. Which frames a global scorer keeps tokens of
  is known only after the encoder, so per-frame placeholder runs cannot be laid out in advance.
  Instead the pruned video is one *span* of ``num_text + k`` placeholder slots (``num_text``:
  the timestamp and delimiter tokens of all frames, known from the processor; ``k``: the keep
  count over the whole video, ``num_kept(T*h*w, ratio)``), and the model fills the span with
  the unpruned sequence minus the dropped visual tokens: every frame's timestamp text and
  delimiters (as text embeddings, no deepstack contribution) and its kept tokens, in order,
  each at its unpruned M-RoPE position. The scorer sees the whole video's tokens with the grid
  (T, h, w). vLLM's own EVS does the same for Qwen3-VL (its placeholder lumps all kept tokens
  behind the first timestamp and the model supplies the interleaved embeddings); here the slots
  are all ``<|video_pad|>`` tokens, so the prompt's token ids inside a pruned video do not show
  the timestamps (its length, positions and embeddings are exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models._qwen import (
    Embeds,
    TokenPruneQwenVLModelMixin,
    TokenPruneQwenVLProcessorMixin,
    rows_of,
)
from vllm_tokenprune.models.positions import MediaSpan, span_positions
from vllm_tokenprune.models.wire import params_key, text_key
from vllm_tokenprune.plan import ItemPlan


class TokenPruneQwen3VLMultiModalProcessor(
    TokenPruneQwenVLProcessorMixin, Qwen3VLMultiModalProcessor
):
    def _tp_pruned_tokens(self, modality: str, full: list[int], params: ItemPlan) -> list[int]:
        if modality != "video":
            return super()._tp_pruned_tokens(modality, full, params)
        video_token_id = int(self.info.get_hf_config().video_token_id)
        num_visual = sum(1 for t in full if t == video_token_id)
        if num_visual != params.num_tokens:
            raise RuntimeError(
                f"vllm-tokenprune: the video placeholder has {num_visual} video tokens but the "
                f"processor counted {params.num_tokens}"
            )
        return [video_token_id] * (len(full) - num_visual + params.num_keep)


def _timestamps(value: Any) -> list[list[float]]:
    """The batched ``timestamps`` field as one list of floats per video."""
    if isinstance(value, torch.Tensor):
        return [[float(x) for x in row] for row in value.reshape(value.shape[0], -1).tolist()]
    return [[float(x) for x in torch.as_tensor(v).reshape(-1).tolist()] for v in value]


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class TokenPruneQwen3VLForConditionalGeneration(
    TokenPruneQwenVLModelMixin, Qwen3VLForConditionalGeneration
):
    visual_dim: int
    multiscale_dim: int
    _tokenizer: Any
    # No ``alvts`` mixin: deepstack features join the visual tokens inside the first decoder
    # layers, and a skipped token's would be lost (not designed yet, docs/alvts.md); a server
    # enabling it is refused at start-up.

    def _tp_embed_width(self) -> int:
        return self.visual_dim + self.multiscale_dim

    def _tp_score_view(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, : self.visual_dim]

    def _tp_video_tokens(self, t: int, h: int, w: int, timestamps: Sequence[float]) -> list[int]:
        """Token ids of the unpruned placeholder of a (t, h, w) video (vLLM's own layout)."""
        return list(_video_tokens(self, t, h * w, tuple(timestamps)))

    def _tp_embed_videos(self, mm_input: Any, kwargs: Mapping[str, object]) -> Embeds:
        params = kwargs.get(params_key("video"))
        text = kwargs.get(text_key("video"))
        timestamps = _timestamps(kwargs["timestamps"])

        def run(sub: Any, items: range) -> Embeds:
            return self._tp_embed_video_items(sub, rows_of(params, items), rows_of(text, items),
                                              timestamps[items.start: items.stop])

        return self._tp_in_chunks(mm_input, "video", run, kwargs)

    def _tp_embed_video_items(self, mm_input: Any, params: Any, text: Any,
                              timestamps: list[list[float]]) -> Embeds:
        """Each video's span: its timestamp/delimiter slots (text embeddings) and its kept
        visual tokens, in order, each with its unpruned position. The span's layout is host
        data (the prompt's token ids); the kept slots are gathered on the device with the
        scorer's device indices (no device-to-host sync)."""
        embeds = faults.shorten_for_test(self._process_video_input(mm_input), params)
        grids = self._llm_grid(mm_input["video_grid_thw"])
        items = self._tp_params(params, [e.shape[0] for e in embeds], grids)
        keep = self._tp_select("video", [self._tp_score_view(e) for e in embeds], items, text)
        video_token_id = int(self.config.video_token_id)
        out = []
        for emb, (t, h, w), idx, stamps in zip(embeds, grids, keep, timestamps, strict=True):
            dev = emb.device
            tokens = self._tp_video_tokens(t, h, w, stamps)
            ids = torch.tensor(tokens, dtype=torch.long)
            visual = ids == video_token_id
            visual_slots = visual.nonzero().flatten()
            text_slots = (~visual).nonzero().flatten()
            n_rows = int(emb.shape[0])
            if idx is None:
                idx = torch.arange(n_rows, device=dev)
            # rows and grid disagree (a count-mismatch fallback): spread the slots like the rows
            slot_idx = idx if n_rows == visual_slots.shape[0] else fallbacks.uniform_fallback(
                int(visual_slots.shape[0]), int(idx.shape[0]), dev)
            kept_visual = visual_slots.to(dev, non_blocking=True).index_select(0, slot_idx)
            text_dev = text_slots.to(dev, non_blocking=True)
            order = torch.sort(torch.cat([text_dev, kept_visual]), stable=True)
            kept = order.values
            dest = torch.empty_like(order.indices)  # where each slot's row goes in the span
            dest[order.indices] = torch.arange(kept.shape[0], device=dev)
            n_text = int(text_slots.shape[0])
            rows = emb.new_zeros(kept.shape[0], emb.shape[1])
            rows.index_copy_(0, dest[n_text:], emb.index_select(0, idx))
            text_rows = self.get_language_model().embed_input_ids(
                ids[text_slots].to(dev, non_blocking=True))
            rows[:, : self.visual_dim] = rows[:, : self.visual_dim].index_copy(
                0, dest[:n_text], text_rows.to(rows.dtype))
            pos = self._tp_host_positions(span_positions(tokens, video_token_id, h, w))
            out.append(self._tp_with_positions(
                rows, pos.to(dev, non_blocking=True).index_select(0, kept)))
        return tuple(out)

    def _tp_feature_span(self, feature: Any) -> MediaSpan:
        if feature.modality != "video":
            return super()._tp_feature_span(feature)
        data = feature.data
        (t, h, w), = self._llm_grid(data["video_grid_thw"].data)
        (stamps,) = _timestamps([data["timestamps"].data])
        tokens = self._tp_video_tokens(t, h, w, stamps)
        pos = span_positions(tokens, int(self.config.video_token_id), h, w)
        return MediaSpan.of_positions(feature.mm_position.offset, feature.mm_position.length, pos)


@lru_cache(maxsize=256)
def _video_tokens(model: TokenPruneQwen3VLForConditionalGeneration, t: int, frame_tokens: int,
                  timestamps: tuple[float, ...]) -> tuple[int, ...]:
    if len(timestamps) != t:
        raise ValueError(f"{len(timestamps)} timestamps for a video of {t} frames")
    repl = Qwen3VLMultiModalProcessor.get_video_repl(
        tokens_per_frame=[frame_tokens] * t,
        timestamps=list(timestamps),
        tokenizer=model._tokenizer,
        vision_start_token_id=model.config.vision_start_token_id,
        vision_end_token_id=model.config.vision_end_token_id,
        video_token_id=model.config.video_token_id,
    )
    return tuple(int(x) for x in repl.full)
