"""Offline timings for the serving benchmark (``python -m benchmarks.serving``): the parts of
a request pruning cannot shorten.

Run in the benchmark process while no request is in flight (before the server starts), on the
same machine, thread count and input shapes as the server:

* ``preprocess``: the model's Hugging Face image processor on the request's image (vLLM runs it in
  the API server before anything else; resize, normalise, patchify).
* ``encoder``: the vision tower of the same checkpoint (transformers'
  ``Qwen2_5_VisionTransformerPretrainedModel`` with the checkpoint's ``visual.*`` weights, float32,
  SDPA attention) on the processed pixels. vLLM runs its own implementation of the same
  layers; both are plain torch matmuls and SDPA on CPU.

Pruning happens after the encoder, so ``preprocess + encoder`` is the floor of every pruned
request's TTFT; the ideal speed-up in the report uses it.
"""

from __future__ import annotations

import base64
import io
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def _median_time(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def image_from_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def load_vision_tower(model_dir: str | Path) -> Any:
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = AutoConfig.from_pretrained(model_dir)
    vcfg = cfg.vision_config
    vcfg._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg, torch_dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"vision tower weights missing from the checkpoint: {missing[:5]}")
    return tower.eval()


def time_image_path(model_dir: str | Path, image: Image.Image, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of preprocessing and of the vision encoder for one image."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir).image_processor
    pre = _median_time(lambda: proc(images=[image], return_tensors="pt"), repeats)
    inputs = proc(images=[image], return_tensors="pt")
    tower = load_vision_tower(model_dir)
    pixels, grid = inputs["pixel_values"].float(), inputs["image_grid_thw"]
    with torch.inference_mode():
        enc = _median_time(lambda: tower(pixels, grid_thw=grid), repeats)
    merge = tower.spatial_merge_size
    t, h, w = (int(v) for v in grid[0])
    return {
        "preprocess_s": pre,
        "encoder_s": enc,
        "patches": int(pixels.shape[0]),
        "visual_tokens": t * h * w // merge**2,
        "threads": torch.get_num_threads(),
        "encoder_params": sum(p.numel() for p in tower.parameters()),
    }


def model_summary(model_dir: str | Path) -> dict[str, Any]:
    """Sizes of the checkpoint: parameters counted from the safetensors headers."""
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    tc, vc = cfg.get_text_config(), cfg.vision_config
    counts = {"lm_layers": 0, "vision": 0, "embeddings_and_head": 0}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                if "visual." in key:
                    counts["vision"] += n
                elif ".layers." in key:
                    counts["lm_layers"] += n
                else:
                    counts["embeddings_and_head"] += n
    return {
        "lm_params": counts["lm_layers"], "vision_params": counts["vision"],
        "embed_head_params": counts["embeddings_and_head"],
        "lm_layers": tc.num_hidden_layers, "lm_hidden": tc.hidden_size,
        "lm_intermediate": tc.intermediate_size, "lm_heads": tc.num_attention_heads,
        "lm_kv_heads": tc.num_key_value_heads, "vocab": tc.vocab_size,
        "vision_depth": vc.depth, "vision_hidden": vc.hidden_size,
        "vision_intermediate": vc.intermediate_size,
    }
