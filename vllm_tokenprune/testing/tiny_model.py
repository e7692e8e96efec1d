"""Build tiny random-weight vision-language checkpoints that vLLM and transformers both load.

Nothing can be downloaded from a model hub here, so the tests and the README's demo build their
models locally::

    python -m vllm_tokenprune.testing.tiny_model {qwen2_5_vl,qwen2_vl,qwen3_vl,llava,llava_next} \
        OUTDIR [--seed 0]

The checkpoint has the real architecture (config, weight names, processor, special tokens and
chat template of the family) at toy sizes, random weights, and a small byte-level BPE tokenizer
made with the ``tokenizers`` library. Its answers are gibberish; its token accounting, positions
and logits are exactly those of the real model class, which is what the tests check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL family's chat template (system prompt default, vision placeholders per item).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few sentences to learn BPE merges from, so that prompts are not one token per byte.
_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in one sentence.",
    "What is in the picture? What colour is it? How many objects are there?",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant image video picture describe the a an of in on",
] * 4


def build_tokenizer(special_tokens: list[str], chat_template: str, eos: str, pad: str):  # noqa: ANN201
    """A byte-level BPE tokenizer with the family's special tokens, as a transformers fast
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in special_tokens if t not in (eos, pad)],
        model_max_length=32768,
    )
    fast.chat_template = chat_template
    return fast


def _randomize(model) -> None:  # noqa: ANN001
    """Larger logits spread than the default init: a stricter comparison. Call right after
    building the model under ``torch.manual_seed`` (reproducible)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)


def _write_generation_config(out: Path, bos: int, eos: int) -> None:
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


#: ``rope_theta`` of the tiny Qwen2-VL / Qwen2.5-VL LMs. Their M-RoPE gives the h and w
#: sections the *lowest* frequencies of a 32-wide head (sections [4, 6, 6]): with Qwen's 1e6 a
#: w position step turns them by at most 1.8e-4 rad, far below what a logprob comparison sees,
#: so a kept token at the wrong column would pass. At 10 a step turns w by 0.12-0.24 rad and h
#: by 0.24-0.56 rad: the reference tests' position controls (tests/_suite.py) show that a
#: column shift or an h/w swap moves the logprobs by many times the tolerance.
QWEN_TINY_ROPE_THETA = 10.0


def _qwen_text_config(tokenizer, ids: dict[str, int], hidden: int, text_layers: int,  # noqa: ANN001
                      mrope_section: list[int], rope_theta: float = QWEN_TINY_ROPE_THETA,
                      **extra: object) -> dict[str, object]:
    num_heads = hidden // 32
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": rope_theta,
                               "mrope_section": mrope_section}
    rope.update(extra.pop("rope_extra", {}))  # type: ignore[arg-type]
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": rope,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": False,
        **extra,
    }


def build_qwen2_5_vl(outdir: str | Path, seed: int = 0, *, text_layers: int = 2,
                     hidden: int = 128, vision_depth: int = 2,
                     intermediate_size: int | None = None, num_heads: int | None = None,
                     num_kv_heads: int | None = None, vision_hidden: int = 64,
                     vision_intermediate: int = 128, vision_heads: int = 2,
                     max_pixels: int = 448 * 448, init_std: float | None = None,
                     rope_theta: float = QWEN_TINY_ROPE_THETA) -> Path:
    """Tiny Qwen2.5-VL: 2-layer LM (hidden 128, head_dim 32, ``rope_theta`` 10: see
    :data:`QWEN_TINY_ROPE_THETA`), 2-block vision tower.

    The keyword arguments after ``vision_depth`` size it up (``benchmarks.serving``'s mid-size
    model) and default to the tiny model: the LM's ``intermediate_size`` (``2 * hidden``),
    ``num_heads`` (``hidden // 32``) and ``num_kv_heads`` (``num_heads // 2``), the vision
    tower's width, MLP width and heads, the processors' ``max_pixels`` (per image and per video
    frame) and ``init_std``, the standard deviation of the random weights (0.05; deep stacks
    want less), and ``rope_theta``.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>"
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    sizes: dict[str, object] = {}
    mrope_section = [4, 6, 6]
    if intermediate_size is not None:
        sizes["intermediate_size"] = intermediate_size
    if num_heads is not None or num_kv_heads is not None:
        heads = num_heads or hidden // 32
        sizes["num_attention_heads"] = heads
        sizes["num_key_value_heads"] = num_kv_heads or max(1, heads // 2)
        half = hidden // heads // 2  # M-RoPE (t, h, w) sections in Qwen's 1/4, 3/8, 3/8 split
        mrope_section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, ids, hidden, text_layers, mrope_section,
                                      rope_theta, **sizes),
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "num_heads": vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    if init_std is None:
        _randomize(model)
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(out, safe_serialization=True)

    min_pixels = 56 * 56
    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        cap_pixels_per_frame=False,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, ids["<|endoftext|>"], ids["<|im_end|>"])
    return out


def build_qwen2_vl(outdir: str | Path, seed: int = 0, *, text_layers: int = 2,
                   hidden: int = 128, vision_depth: int = 2,
                   rope_theta: float = QWEN_TINY_ROPE_THETA) -> Path:
    """Tiny Qwen2-VL: 2-layer LM (hidden 128, head_dim 32, ``rope_theta`` 10: see
    :data:`QWEN_TINY_ROPE_THETA`), 2-block vision tower (patch 14, 2x2 merge, no window
    attention: Qwen2-VL's own vision transformer)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>"
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, ids, hidden, text_layers, [4, 6, 6],
                                      rope_theta),
        vision_config={
            "depth": vision_depth,
            "embed_dim": 64,
            "hidden_size": hidden,  # Qwen2-VL: the merger's output width (= the LM's)
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    model.save_pretrained(out, safe_serialization=True)

    min_pixels, max_pixels = 56 * 56, 448 * 448
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=14, merge_size=2, temporal_patch_size=2, size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            patch_size=14, merge_size=2, temporal_patch_size=2, size=size,
            cap_pixels_per_frame=False),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, ids["<|endoftext|>"], ids["<|im_end|>"])
    return out


def build_qwen3_vl(outdir: str | Path, seed: int = 0, *, text_layers: int = 2,
                   hidden: int = 128, vision_depth: int = 3) -> Path:
    """Tiny Qwen3-VL: 2-layer LM (hidden 128, head_dim 32, interleaved M-RoPE), 3-block vision
    tower (patch 16, 2x2 merge) whose blocks 0 and 1 feed "deepstack" features to LM layers 0
    and 1, and the Qwen3-VL video processor (timestamps between frames)."""
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>"
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = _qwen_text_config(tokenizer, ids, hidden, text_layers, [6, 5, 5], head_dim=32,
                             rope_extra={"mrope_interleaved": True})
    text["rope_parameters"]["rope_theta"] = 5000000.0  # type: ignore[index]
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={
            "depth": vision_depth,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 144,  # a 12x12 table, interpolated to any grid
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    model.save_pretrained(out, safe_serialization=True)

    min_pixels, max_pixels = 64 * 64, 512 * 512
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen3VLProcessor(
        # Qwen3-VL normalises images and videos alike (mean = std = 0.5); vLLM normalises
        # both on device with the image processor's values.
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
            fps=2, min_frames=2, max_frames=16, cap_pixels_per_frame=False),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, ids["<|endoftext|>"], ids["<|im_end|>"])
    return out


LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# llava-hf's LLaVA-1.5 / LLaVA-NeXT (vicuna) prompt format: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llava_configs(tokenizer, hidden: int, text_layers: int, image_size: int,  # noqa: ANN001
                   vision_layers: int) -> tuple[dict[str, object], dict[str, object]]:
    num_heads = hidden // 32
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<s>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("</s>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<pad>"),
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 14,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
    }
    return text, vision


def _use_llava_hf_vision_names(out: Path) -> None:
    """transformers 5 saves the CLIP tower of LLaVA models as ``vision_tower.<module>``; the
    llava-hf checkpoints (and vLLM's loader) name it ``vision_tower.vision_model.<module>``.
    transformers loads both, so rewrite the file in the llava-hf form."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(path)
    prefix = "vision_tower."
    renamed = {
        (f"{prefix}vision_model.{k[len(prefix):]}"
         if k.startswith(prefix) and not k.startswith(f"{prefix}vision_model.") else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_llava(outdir: str | Path, seed: int = 0, *, text_layers: int = 2, hidden: int = 128,
                image_size: int = 112) -> Path:
    """Tiny LLaVA-1.5: CLIP ViT (3 layers, 112 px, patch 14: an 8x8 grid, features of layer -2
    without CLS), 2-layer MLP projector, 2-layer Llama (hidden 128, head_dim 32)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, eos="</s>", pad="<pad>")
    tokenizer.bos_token = "<s>"
    tokenizer.unk_token = "<unk>"
    text, vision = _llava_configs(tokenizer, hidden, text_layers, image_size, 3)
    n = image_size // 14
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n * n,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    model.save_pretrained(out, safe_serialization=True)
    _use_llava_hf_vision_names(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, tokenizer.convert_tokens_to_ids("<s>"),
                             tokenizer.convert_tokens_to_ids("</s>"))
    return out


#: Any-resolution grid of the tiny LLaVA-NeXT, in pixels of 56-px tiles (the real model's
#: pinpoints scaled from 336-px tiles): up to 3 tiles per side.
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def build_llava_next(outdir: str | Path, seed: int = 0, *, text_layers: int = 2,
                     hidden: int = 128, image_size: int = 56) -> Path:
    """Tiny LLaVA-NeXT: CLIP ViT at 56 px (a 4x4 grid per tile), any-resolution tiling over
    :data:`LLAVA_NEXT_PINPOINTS` (base image + up to 4 tiles, unpadded, one image-newline token
    per row), 2-layer Llama (hidden 128, head_dim 32)."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, eos="</s>", pad="<pad>")
    tokenizer.bos_token = "<s>"
    tokenizer.unk_token = "<unk>"
    text, vision = _llava_configs(tokenizer, hidden, text_layers, image_size, 3)
    n = image_size // 14
    config = LlavaNextConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n * n,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    _use_llava_hf_vision_names(out)

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, tokenizer.convert_tokens_to_ids("<s>"),
                             tokenizer.convert_tokens_to_ids("</s>"))
    return out


BUILDERS = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen2_vl": build_qwen2_vl,
    "qwen3_vl": build_qwen3_vl,
    "llava": build_llava,
    "llava_next": build_llava_next,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("outdir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = BUILDERS[args.family](args.outdir, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
