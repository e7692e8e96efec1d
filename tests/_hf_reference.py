"""Reference next-token log-probabilities computed outside vLLM, with transformers' own models.

For every supported family the reference runs transformers' model on the same weights and
prompt, computes every media item's embeddings with transformers' vision tower, selects the
kept tokens with the plugin's pure-torch scorer (the same call the vLLM hook makes, on the same
features), and feeds the language model only the kept embeddings:

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: at the M-RoPE positions transformers itself assigns them in
  the unpruned sequence (its own ``get_rope_index``); the text between and after media keeps
  its unpruned positions too. A Qwen3-VL video keeps its timestamp text and frame delimiters
  (they are text); Qwen3-VL's deepstack features are fed for the kept tokens only, with the
  same selection.
* LLaVA-1.5 / LLaVA-NeXT: at contiguous positions (1-D RoPE). LLaVA-NeXT's image-newline
  embeddings (found by value: transformers inserts its ``image_newline`` parameter) are all
  kept and never scored; the budget is global over the image's other tokens.

Text-conditioned methods (ResPrune, CDPruner) get the embeddings of the prompt's text tokens
as the integration documents them: the chat prompt before media expansion, special and media
tokens removed, the last 256.

Videos are decoded with OpenCV (as vLLM's default loader does) and handed to the HF processor
with the same metadata vLLM gives it. Nothing here touches vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.preview._extract import Prepared, load, prepare, select


def _load(model_dir: str) -> tuple[Any, Any]:
    return load(model_dir)


def _kept_rows(prep: Prepared, ratios: dict[str, float], method: str, min_keep: int,
               kept: list[list[int]] | None) -> list[set[int]]:
    """Each item's kept rows: the preview's selection (:mod:`vllm_tokenprune.preview`), or the
    given ``kept`` (rows per item, in ``prep.items`` order)."""
    if kept is not None:
        assert len(kept) == len(prep.items), "one kept list per media item"
        return [set(k) for k in kept]
    cfg = TokenPruneConfig(min_keep=min_keep)
    return [set(select(prep, item, ratios[item.modality], method, cfg).tolist())
            for item in prep.items]


def reference_logprobs(model_dir: str | Path, media: list[Any], text: str, prune_ratio: float,
                       method: str = "lrcp", *, video_prune_ratio: float | None = None,
                       min_keep: int = 1,
                       kept: list[list[int]] | None = None) -> tuple[torch.Tensor, int]:
    """(log-probabilities of the first generated token (vocab,), pruned prompt length).

    ``media``: PIL images and mp4 bytes, in prompt order (videos: Qwen families only).
    ``kept``: each item's kept rows (as the preview reports them in ``ItemResult.kept_rows``,
    images before videos); None: select them here with the preview's selection.
    """
    prep = prepare(str(model_dir), media, text)
    ratios = {"image": prune_ratio,
              "video": prune_ratio if video_prune_ratio is None else video_prune_ratio}
    keep = _kept_rows(prep, ratios, method, min_keep, kept)
    if prep.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return _qwen(prep, keep)
    return _llava(prep, keep)


def qwen_reference_logprobs(model_dir: str | Path, images: list[Any], text: str,
                            prune_ratio: float, method: str = "lrcp",
                            min_keep: int = 1) -> tuple[torch.Tensor, int]:
    """:func:`reference_logprobs` for images (kept for the Qwen2.5-VL tests)."""
    return reference_logprobs(model_dir, images, text, prune_ratio, method, min_keep=min_keep)


@torch.no_grad()
def _qwen(prep: Prepared, keep: list[set[int]]) -> tuple[torch.Tensor, int]:
    model, inputs = prep.model, prep.inputs
    input_ids = inputs["input_ids"]
    deepstack = model.config.model_type == "qwen3_vl"

    # per modality: the items (features, deepstack levels, kept rows) in prompt order
    items: dict[str, list[dict[str, Any]]] = {}
    for item, kept_rows in zip(prep.items, keep, strict=True):
        items.setdefault(item.modality, []).append({
            "feat": item.feat, "levels": item.levels, "keep": kept_rows,
            "token": item.token_id,
        })

    rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw",
                                          "second_per_grid_ts") if k in inputs}
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=inputs["attention_mask"], **rope_kwargs)
    positions = _text_after_media_at_max_plus_one(positions, inputs["mm_token_type_ids"])
    text_embeds = model.get_input_embeddings()(input_ids[0])

    # walk the prompt: each modality's placeholder tokens belong to its items in order (a
    # Qwen3-VL video's tokens are split into frames by timestamp text, which is text)
    cursor = {m: [0, 0] for m in items}  # item index, token index within the item
    keep_cols: list[int] = []
    rows: list[torch.Tensor] = []
    deep_rows: list[list[torch.Tensor]] = []
    visual_mask: list[bool] = []
    by_token = {v[0]["token"]: m for m, v in items.items()}
    for col, tok in enumerate(input_ids[0].tolist()):
        modality = by_token.get(tok)
        if modality is None:
            keep_cols.append(col)
            rows.append(text_embeds[col])
            visual_mask.append(False)
            continue
        cur = cursor[modality]
        item = items[modality][cur[0]]
        j = cur[1]
        if j in item["keep"]:
            keep_cols.append(col)
            rows.append(item["feat"][j])
            visual_mask.append(True)
            if item["levels"] is not None:
                deep_rows.append([lvl[j] for lvl in item["levels"]])
        cur[1] += 1
        if cur[1] == item["feat"].shape[0]:
            cur[0], cur[1] = cur[0] + 1, 0
    assert all(c == [len(items[m]), 0] for m, c in cursor.items()), "placeholder count mismatch"

    inputs_embeds = torch.stack(rows)[None]
    pos = positions[:, :, keep_cols]
    mask = torch.ones(1, len(keep_cols), dtype=torch.long)
    if deepstack:
        lm = model.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=pos, attention_mask=mask,
            visual_pos_masks=torch.tensor(visual_mask)[None],
            deepstack_visual_embeds=[torch.stack(level) for level in zip(*deep_rows,
                                                                         strict=True)],
        )
        logits = model.lm_head(lm.last_hidden_state)
    else:
        logits = model(inputs_embeds=inputs_embeds, position_ids=pos,
                       attention_mask=mask).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1), len(keep_cols)


def _text_after_media_at_max_plus_one(positions: torch.Tensor,
                                      token_types: torch.Tensor) -> torch.Tensor:
    """Text after a media run continues at the run's largest position + 1.

    That is the rule of the original Qwen2-VL/2.5-VL ``get_rope_index`` and of vLLM's; since
    v5 transformers advances by ``max(h, w)`` instead, which differs after a video whose time
    positions outrun its height and width (Qwen2.5-VL scales them by ``second_per_grid_ts *
    tokens_per_second``). Images and Qwen3-VL frames (t = 0) are unaffected. Applied here so
    that the reference describes the same unpruned layout as vLLM's own model.
    """
    pos = positions.clone()
    types = token_types[0].tolist()
    shift = 0
    for i in range(len(types)):
        pos[:, 0, i] += shift
        if types[i] != 0 and i + 1 < len(types) and types[i + 1] == 0:
            start = i
            while start > 0 and types[start - 1] == types[i]:
                start -= 1
            want = int(pos[:, 0, start:i + 1].max()) + 1
            shift += want - int(positions[0, 0, i + 1] + shift)
    return pos


@torch.no_grad()
def _llava(prep: Prepared, keep: list[set[int]]) -> tuple[torch.Tensor, int]:
    model, input_ids = prep.model, prep.inputs["input_ids"]
    cfg = model.config
    feats = [item.feat for item in prep.items]
    text_embeds = model.get_input_embeddings()(input_ids[0])
    kept_rows_per_image = [feat[sorted(k)] for feat, k in zip(feats, keep, strict=True)]

    image_token_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    rows: list[torch.Tensor] = []
    ids = input_ids[0].tolist()
    i = image_idx = 0
    while i < len(ids):
        if ids[i] != image_token_id:
            rows.append(text_embeds[i])
            i += 1
            continue
        rows.extend(kept_rows_per_image[image_idx])
        i += feats[image_idx].shape[0]
        image_idx += 1
    assert image_idx == len(feats), "placeholder count mismatch"
    inputs_embeds = torch.stack(rows)[None]  # contiguous positions 0..n-1 (the default)
    out = model(inputs_embeds=inputs_embeds,
                attention_mask=torch.ones(1, len(rows), dtype=torch.long))
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1), len(rows)


@torch.no_grad()
def scored_tokens(model_dir: str | Path, item: Any) -> tuple[int, int]:
    """(tokens the scorer chooses from, placeholder tokens always kept) of one media item, as
    transformers' processor and model lay it out: for LLaVA-NeXT the image-newline tokens are
    the kept ones (found by value), for the others there are none. ``item``: a PIL image or
    mp4 bytes (Qwen families)."""
    from vllm_tokenprune.testing.media import qwen_image_tokens, qwen_video_tokens

    processor, model = _load(str(model_dir))
    cfg = model.config
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        if isinstance(item, bytes):
            return qwen_video_tokens(model_dir, item), 0
        return qwen_image_tokens(model_dir, item), 0
    if cfg.model_type == "llava":
        ids = processor(text=["<image>"], images=[item], return_tensors="pt")["input_ids"][0]
        return int((ids == cfg.image_token_index).sum()), 0
    if cfg.model_type == "llava_next":
        inputs = processor.image_processor(images=[item], return_tensors="pt")
        feat = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True).pooler_output[0]
        newline = (feat == model.model.image_newline.to(feat.dtype)).all(dim=-1)
        return int((~newline).sum()), int(newline.sum())
    raise ValueError(f"unknown model type {cfg.model_type!r}")
