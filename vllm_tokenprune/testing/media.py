"""Images for tests and demos, and the visual-token counts the HF processor gives them."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients, blocks) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([
        (x * 255 // max(1, width - 1)),
        (y * 255 // max(1, height - 1)),
        ((x // 32 + y // 32) % 2) * 200,
    ], axis=-1).astype(np.float64)
    img += rng.normal(0, 25, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image: Image.Image, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image)}, **extra}


def chat_messages(images: list[Image.Image], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [image_part(im) for im in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@lru_cache(maxsize=4)
def _hf_processor(model_dir: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def qwen_image_grid(model_dir: str | Path, image: Image.Image) -> tuple[int, int, int]:
    """(t, h, w) of the image's LM token grid, as the model's own HF processor computes it."""
    proc = _hf_processor(str(model_dir)).image_processor
    out = proc(images=[image], return_tensors="pt")
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    merge = proc.merge_size
    return t, h // merge, w // merge


def qwen_image_tokens(model_dir: str | Path, image: Image.Image) -> int:
    t, h, w = qwen_image_grid(model_dir, image)
    return t * h * w
