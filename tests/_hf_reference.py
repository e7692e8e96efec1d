"""Reference next-token log-probabilities computed outside vLLM, with transformers' own model.

The reference runs transformers' Qwen2.5-VL on the same weights and prompt, computes every
image's embeddings with transformers' vision tower, selects the kept tokens with the plugin's
pure-torch scorer (the same call the vLLM hook makes), and feeds the language model only the
kept embeddings, at the M-RoPE positions transformers itself assigns them in the unpruned
sequence (its own ``get_rope_index``). Nothing here touches vLLM.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from vllm_tokenprune import num_kept, select_tokens
from vllm_tokenprune.models._mixin import MAX_TEXT_TOKENS


@lru_cache(maxsize=2)
def _load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return processor, model.eval()


def qwen_reference_logprobs(model_dir: str | Path, images: list[Any], text: str,
                            prune_ratio: float, method: str = "lrcp",
                            min_keep: int = 1) -> tuple[torch.Tensor, int]:
    """(log-probabilities of the first generated token (vocab,), pruned prompt length)."""
    processor, model = _load(str(model_dir))
    messages = [{"role": "user",
                 "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=images, return_tensors="pt",
                       return_mm_token_type_ids=True)
    input_ids = inputs["input_ids"]
    image_token_id = model.config.image_token_id
    with torch.no_grad():
        feats = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ).pooler_output
        positions, _ = model.model.get_rope_index(
            input_ids,
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        text_embeds = model.get_input_embeddings()(input_ids[0])
        # Text-conditioned scorers see the prompt's text tokens (special and media tokens
        # removed, the last MAX_TEXT_TOKENS), embedded by the LM's input table.
        skip = set(processor.tokenizer.all_special_ids) | {
            model.config.image_token_id, model.config.video_token_id,
            model.config.vision_start_token_id, model.config.vision_end_token_id}
        text_ids = [t for t in input_ids[0].tolist() if t not in skip][-MAX_TEXT_TOKENS:]
        prompt_text_embeds = model.get_input_embeddings()(torch.tensor(text_ids))

        keep_cols: list[int] = []
        rows: list[torch.Tensor] = []
        ids = input_ids[0].tolist()
        i = image_idx = 0
        while i < len(ids):
            if ids[i] != image_token_id:
                keep_cols.append(i)
                rows.append(text_embeds[i])
                i += 1
                continue
            emb = feats[image_idx]
            n = emb.shape[0]
            k = num_kept(n, prune_ratio, min_keep)
            t, h, w = (int(x) for x in inputs["image_grid_thw"][image_idx])
            merge = model.config.vision_config.spatial_merge_size
            idx = select_tokens(emb, k, method, grid=(t, h // merge, w // merge),
                                text_embeds=prompt_text_embeds) if k < n else torch.arange(n)
            keep_cols.extend(i + int(j) for j in idx)
            rows.extend(emb[idx])
            i += n
            image_idx += 1
        inputs_embeds = torch.stack(rows)[None]
        pos = positions[:, :, keep_cols]
        out = model(inputs_embeds=inputs_embeds, position_ids=pos,
                    attention_mask=torch.ones(1, len(keep_cols), dtype=torch.long))
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1), len(keep_cols)
