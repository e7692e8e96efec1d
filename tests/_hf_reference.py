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

The kept rows come from the plugin's own scorers (through the preview); docs/testing.md says
which independent tests pin that shared code. For the reference tests' controls,
:func:`control_sets` gives wrong kept sets of the right sizes and :data:`POSITION_CONTROLS` wrong
media positions (:func:`prepared_logprobs`).
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
    return prepared_logprobs(prep, keep)


#: Wrong positions for the controls of the reference tests (Qwen families): ``swap_hw`` gives
#: every media token its h position in the w channel and w in the h channel (a different layout
#: on a non-square grid); ``shift_w`` moves every media token one column right.
POSITION_CONTROLS = ("swap_hw", "shift_w")


def prepared_logprobs(prep: Prepared, keep: list[set[int]] | list[list[int]],
                      positions: str | None = None) -> tuple[torch.Tensor, int]:
    """:func:`reference_logprobs` on an already prepared prompt (e.g. a preview's
    ``prepared``), with each item's kept rows; ``positions``: one of
    :data:`POSITION_CONTROLS` (Qwen families) to feed the media tokens at wrong positions."""
    steps, n = _steps(prep, keep, positions, [])
    return steps[0], n


def prepared_step_logprobs(prep: Prepared, keep: list[set[int]] | list[list[int]],
                           generated: list[int]) -> torch.Tensor:
    """Greedy decoding's reference: ``(len(generated) + 1, vocab)`` log-probabilities, row k
    of the token after the prompt and ``generated[:k]`` (text tokens appended after the
    prompt at the next positions: Qwen's M-RoPE continues every axis from the last
    position, as the runners' decode positions do; LLaVA's 1-D positions are contiguous)."""
    return _steps(prep, keep, None, list(generated))[0]


def _steps(prep: Prepared, keep: list[set[int]] | list[list[int]], positions: str | None,
           generated: list[int]) -> tuple[torch.Tensor, int]:
    keep = [set(k) for k in keep]
    if prep.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return _qwen(prep, keep, positions, generated)
    if positions is not None:
        raise ValueError("position controls apply to the M-RoPE (Qwen) families only")
    return _llava(prep, keep, generated)


#: Cheap methods whose kept set stands in for "another method's set" in the controls.
_OTHER_METHODS = ("random", "norm", "uniform", "lrcp")


def control_sets(prep: Prepared, kept_rows: list[list[int]], method: str,
                 ratios: dict[str, float], config: TokenPruneConfig | None = None
                 ) -> dict[str, list[list[int]]]:
    """Wrong kept sets of exactly the right sizes, per item, for the reference tests' controls:

    * ``other method``: the set another method keeps at the same ratio (of the cheap
      :data:`_OTHER_METHODS`, the one sharing fewest rows with ``kept_rows``);
    * ``shifted by one``: every kept scored token replaced by the next one (wrapping);
    * ``first k``: the first k scored tokens.

    Always-kept rows (LLaVA-NeXT's image newlines) stay in every set. Each control differs
    from ``kept_rows`` in at least one item (asserted)."""
    def scored_parts(item: Any, rows: list[int]) -> tuple[list[int], list[int], list[int]]:
        scored = item.scored.tolist()
        where = {r: j for j, r in enumerate(scored)}
        idx = sorted(where[r] for r in rows if r in where)
        always = sorted(r for r in rows if r not in where)
        return scored, idx, always

    shifted, first = [], []
    for item, rows in zip(prep.items, kept_rows, strict=True):
        scored, idx, always = scored_parts(item, rows)
        n = len(scored)
        shifted.append(sorted(always + [scored[(j + 1) % n] for j in idx]))
        first.append(sorted(always + scored[:len(idx)]))
    cfg = config or TokenPruneConfig()
    best: tuple[int, list[list[int]]] | None = None
    for other in _OTHER_METHODS:
        if other == method:
            continue
        rows_o = [select(prep, item, ratios[item.modality], other, cfg).tolist()
                  for item in prep.items]
        overlap = sum(len(set(a) & set(b)) for a, b in zip(rows_o, kept_rows, strict=True))
        if best is None or overlap < best[0]:
            best = (overlap, rows_o)
    assert best is not None
    out = {"other method": best[1], "shifted by one": shifted, "first k": first}
    for name, sets in out.items():
        assert [len(s) for s in sets] == [len(k) for k in kept_rows], name
        assert any(set(s) != set(k) for s, k in zip(sets, kept_rows, strict=True)), \
            f"control {name!r} keeps the right set"
    return out


@torch.no_grad()
def _qwen(prep: Prepared, keep: list[set[int]], control: str | None = None,
          generated: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(log-probabilities of the last ``len(generated) + 1`` positions, the prompt's length
    as fed)."""
    generated = generated or []
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
    if control is not None:
        positions = _wrong_media_positions(positions, input_ids[0],
                                           {item.token_id for item in prep.items}, control)
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

    n_prompt = len(keep_cols)
    pos = positions[:, :, keep_cols]
    if generated:
        gen = torch.tensor(generated)
        rows.extend(model.get_input_embeddings()(gen))
        visual_mask.extend([False] * len(generated))
        pos = torch.cat([pos, pos[:, :, -1:] + torch.arange(1, len(generated) + 1)], dim=2)
    inputs_embeds = torch.stack(rows)[None]
    mask = torch.ones(1, inputs_embeds.shape[1], dtype=torch.long)
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
    last = logits[0, -(len(generated) + 1):].float()
    return torch.log_softmax(last, dim=-1), n_prompt


def _wrong_media_positions(positions: torch.Tensor, ids: torch.Tensor, media_ids: set[int],
                           control: str) -> torch.Tensor:
    """``positions`` (3, 1, L) with the media tokens' (t, h, w) moved as ``control`` says."""
    pos = positions.clone()
    media = torch.tensor([int(t) in media_ids for t in ids.tolist()])
    if control == "swap_hw":
        pos[1, 0, media], pos[2, 0, media] = positions[2, 0, media], positions[1, 0, media]
    elif control == "shift_w":
        pos[2, 0, media] += 1
    else:
        raise ValueError(f"unknown position control {control!r}; known: {POSITION_CONTROLS}")
    return pos


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
def _llava(prep: Prepared, keep: list[set[int]],
           generated: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(log-probabilities of the last ``len(generated) + 1`` positions, the prompt's length
    as fed)."""
    generated = generated or []
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
    n_prompt = len(rows)
    if generated:
        rows.extend(model.get_input_embeddings()(torch.tensor(generated)))
    inputs_embeds = torch.stack(rows)[None]  # contiguous positions 0..n-1 (the default)
    out = model(inputs_embeds=inputs_embeds,
                attention_mask=torch.ones(1, len(rows), dtype=torch.long))
    last = out.logits[0, -(len(generated) + 1):].float()
    return torch.log_softmax(last, dim=-1), n_prompt


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
