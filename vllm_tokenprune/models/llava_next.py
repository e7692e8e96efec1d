"""``TokenPruneLlavaNextForConditionalGeneration``: LLaVA-NeXT with visual-token pruning (a family
module: the processor side runs in the API server, the model side in the worker).

An image becomes the base image's tokens (one tile at the encoder resolution) followed by the
any-resolution tiles, stitched into one grid, with the padding rows/columns removed and an
``image_newline`` embedding after every row: ``base + rows * (width + 1)`` placeholder tokens.

Decisions:

* **One budget per image, global over the base image and all tiles.** The scorer sees every
  visual token of the image at once (base first, then the high-resolution grid row-major, as
  the LM sees them), N = ``base + rows * width``, and keeps ``num_kept(N, ratio)`` of them
  wherever they are: a tile with more information can keep more than its share. (No token grid
  is passed: the base image and the stitched grid are two layouts, so ``uniform`` strides over
  the N tokens in sequence order.)
* **Image-newline tokens are kept, all of them, and are not part of N.** They are the layout
  signal the LM was trained with, one per row of the stitched grid; their number depends only
  on the image size, so the placeholder count, ``num_kept(N, ratio) + rows``, is exact before
  the encoder runs. A row whose tokens are all dropped still ends with its newline.
* Positions are 1-D: the kept tokens and newlines, in their original order, take contiguous
  positions (as in LLaVA-1.5).

The processor computes ``(base, rows, width)`` with vLLM's own token-count helpers (the sum is
checked against vLLM's placeholder count) and ships them in the per-item params row; the model
checks that its merged embedding has that layout before pruning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenprune.alvts.model import AlvtsModelMixin
from vllm_tokenprune.models import fallbacks
from vllm_tokenprune.models.model_hooks import TokenPruneModelMixin, rows_of
from vllm_tokenprune.models.positions import row_separator_mask
from vllm_tokenprune.models.processor import TokenPruneProcessorMixin
from vllm_tokenprune.models.wire import (
    METHODS_BY_ID,
    PARAMS_HEAD,
    ItemLayout,
    ItemParams,
    params_key,
    text_key,
)
from vllm_tokenprune.plan import ItemPlan
from vllm_tokenprune.scoring import LAYER, get_method


class TokenPruneLlavaNextMultiModalProcessor(
    TokenPruneProcessorMixin, LlavaNextMultiModalProcessor
):
    tp_prunes_embeds = False

    def _tp_anyres_layout(self, height: int, width: int) -> tuple[int, int, int]:
        """(base tokens, rows, tokens per row) of an image of this size, with vLLM's helpers."""
        info = self.info
        hf_config = info.get_hf_config()
        encoder = info.get_vision_encoder_info()
        base = get_num_selected_vision_tokens(
            encoder.get_num_image_tokens(image_width=width, image_height=height),
            hf_config.vision_feature_select_strategy,
        )
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            image_size=(height, width),
            grid_pinpoints=hf_config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        unpadded, newlines = info._get_num_unpadded_features(
            original_height=height,
            original_width=width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=tiles_h,
            num_patch_width=tiles_w,
        )
        total = info.get_num_image_tokens(image_width=width, image_height=height)
        if base + unpadded + newlines != total or (newlines and unpadded % newlines):
            raise RuntimeError(
                f"vllm-tokenprune: cannot lay out a {width}x{height} LLaVA-NeXT image "
                f"({base} + {unpadded} + {newlines} != {total})"
            )
        return base, newlines, unpadded // newlines if newlines else 0

    def _tp_item_layouts(self, modality: str, hf_out: Mapping[str, Any]) -> list[ItemLayout] | None:
        sizes = hf_out.get("image_sizes")
        if modality != "image" or sizes is None:
            return None
        out = []
        for height, width in torch.as_tensor(sizes).reshape(-1, 2).tolist():
            base, rows, row_width = self._tp_anyres_layout(int(height), int(width))
            out.append(ItemLayout(base + rows * row_width, None, (base, rows, row_width)))
        return out

    def _tp_layout_charge(self, layout: ItemLayout) -> int:
        return layout.num_tokens + layout.extra[1]  # + one newline token per row

    def _tp_pruned_tokens(self, modality: str, full: list[int], params: ItemPlan) -> list[int]:
        _, rows, _ = params.extra
        if len(set(full)) != 1 or len(full) != params.num_tokens + rows:
            raise RuntimeError(
                f"vllm-tokenprune: the image placeholder has {len(full)} tokens, expected "
                f"{params.num_tokens} visual + {rows} newline tokens of one id"
            )
        return full[:1] * (params.num_keep + rows)


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneLlavaNextMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenPruneLlavaNextForConditionalGeneration(
    AlvtsModelMixin, TokenPruneModelMixin, LlavaNextForConditionalGeneration
):
    """A Llama / Qwen2 language model: ``alvts`` routes its decoder layers; image-newline rows
    always go through."""

    tp_mrope = False

    def _tp_charge(self, p: ItemParams) -> int:
        return p.num_tokens + (p.extra[1] if len(p.extra) > 1 else 0)  # + newline tokens

    def embed_multimodal(self, **kwargs: object) -> Any:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        params = kwargs.get(params_key("image"))
        if not isinstance(params, torch.Tensor):  # e.g. precomputed embeddings: no layout
            return list(self._process_image_input(self._tp_stage(image_input)))
        text = kwargs.get(text_key("image"))

        def run(sub: Any, items: range) -> list[torch.Tensor]:
            merged = list(self._process_image_input(sub))
            return self._tp_prune_merged(merged, rows_of(params, items), rows_of(text, items))

        charges = [self._tp_row_charge(r) for r in params.tolist()]
        if image_input["type"] != "pixel_values":
            return run(image_input, range(len(charges)))
        return self._tp_encode_in_chunks(charges, image_input, None, run,
                                         profile=self._tp_is_profile(kwargs, "image"))

    def _tp_prune_merged(self, merged: list[torch.Tensor], params: torch.Tensor,
                         text: Any) -> list[torch.Tensor]:
        """Each image's kept rows: its kept visual tokens and every newline row, in order.

        The newline layout is host data; the kept rows are gathered on the device with the
        scorer's device indices (no device-to-host sync)."""
        params = params.reshape(len(merged), -1)
        raw = params.tolist()
        newlines: list[torch.Tensor | None] = []
        for m, r in zip(merged, raw, strict=True):
            try:
                newlines.append(row_separator_mask(m.shape[0], *r[PARAMS_HEAD:PARAMS_HEAD + 3]))
            except (RuntimeError, TypeError) as e:  # never let a layout surprise kill the engine
                fallbacks.report_fallback(_method_of(r), fallbacks.LAYOUT, str(e))
                newlines.append(None)
        if any(nl is None for nl in newlines):
            return [self._tp_unlaid_out(m, r) for m, r in zip(merged, raw, strict=True)]
        feats = [m[~nl] for m, nl in zip(merged, newlines, strict=True)]  # host mask: no sync
        items = self._tp_params(params, [f.shape[0] for f in feats])
        keep = self._tp_select("image", feats, items, text)
        out = []
        for m, nl, idx, p in zip(merged, newlines, keep, items, strict=True):
            assert nl is not None
            if p.stage == LAYER:  # newline rows always go through
                out.append(self._tp_layer_rows(m, p, nl))
                continue
            if idx is None:
                out.append(m)
                continue
            visual = (~nl).nonzero().flatten().to(m.device, non_blocking=True)
            breaks = nl.nonzero().flatten().to(m.device, non_blocking=True)
            slots = torch.cat([visual.index_select(0, idx), breaks]).sort().values
            out.append(m.index_select(0, slots))
        return out

    def _tp_unlaid_out(self, merged: torch.Tensor, row: list[int]) -> torch.Tensor:
        """An image of a batch whose layout could not be read: a layer-stage method's items
        go through every layer; others keep their placeholder count (``num_keep`` + one newline
        per row, as far as the row says) of rows, evenly spread."""
        n = int(merged.shape[0])
        method = _method_of(row)
        if method != "-" and get_method(method).stage == LAYER:
            p = ItemParams(0, method, n, None, (), LAYER)
            return self._tp_layer_rows(merged, p, torch.ones(n, dtype=torch.bool))
        keep = int(row[0]) + (int(row[PARAMS_HEAD + 1]) if len(row) > PARAMS_HEAD + 1 else 0)
        if len(row) < 3 or int(row[0]) >= int(row[2]) or not 0 < keep < n:
            return merged
        return merged.index_select(0, fallbacks.uniform_fallback(n, keep, merged.device))


def _method_of(row: list[int]) -> str:
    return METHODS_BY_ID.get(int(row[1]), "-") if len(row) > 1 else "-"
