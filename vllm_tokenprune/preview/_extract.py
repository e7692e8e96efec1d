"""Media tokens as the served model sees them, computed with transformers on the same weights.

For each media item of a chat prompt this runs the model's own processor, vision tower and
projector (``get_image_features`` / ``get_video_features``) and returns the embedding rows in
placeholder order, which of them the scorer chooses from, the grid the scorer is given, and
where each scored token lies on the picture (:class:`Panel`). :func:`select` then picks the kept
rows exactly as the vLLM integration does: same keep-count (:func:`num_kept` with the server's
``min_keep``), same scorer and options, same prompt text for text-conditioned methods.

Per family (mirroring the integration, see docs/models.md):

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one row per merged patch, grid ``(t, h, w)`` in LM tokens;
  a video is ``t`` frame groups (``temporal_patch_size`` frames each). Qwen3-VL's deepstack
  copies follow the same selection (``Item.levels``).
* LLaVA-1.5: one row per patch of the square crop, grid ``(1, side, side)``.
* LLaVA-NeXT: the base image, then the stitched tiles with an image-newline row after every
  row; newlines (found by value) are always kept and never scored; no grid.

:mod:`tests._hf_reference` feeds the kept rows to transformers' language model to check that
the server kept the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.scoring import get_method, num_kept, select_tokens

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
LLAVA_TYPES = ("llava", "llava_next")
SUPPORTED_TYPES = QWEN_TYPES + LLAVA_TYPES
#: The integration hands text-conditioned scorers the prompt's last 256 text tokens.
MAX_TEXT_TOKENS = 256

Grid = tuple[int, int, int]


class PreviewError(ValueError):
    """A model the preview cannot run, or media it cannot read."""


@dataclass
class Panel:
    """One picture of an item: ``image`` covered by an ``h`` x ``w`` grid of tokens, which are
    the item's scored tokens ``offset .. offset + h*w - 1`` in row-major order."""

    image: Image.Image
    h: int
    w: int
    offset: int
    label: str = ""


@dataclass
class Item:
    """One media item: ``feat`` (R, D) rows in placeholder order, ``scored`` the rows the
    scorer chooses from, ``grid`` the layout it is given."""

    modality: str
    feat: torch.Tensor
    scored: torch.Tensor
    grid: Grid | None
    token_id: int
    panels: list[Panel] = field(default_factory=list)
    levels: tuple[torch.Tensor, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.scored.numel())


@dataclass
class Prepared:
    """A prompt with its media, run through the processor and vision tower once."""

    model_type: str
    processor: Any
    model: Any
    prompt: str
    inputs: Any
    items: list[Item]
    text_embeds: torch.Tensor | None
    media: list[Any] = field(default_factory=list)


@lru_cache(maxsize=2)
def load(model_dir: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(processor, model) from a local directory or hub id, as transformers loads them."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise PreviewError(f"cannot load a model config from {model_dir!r}: {e}") from None
    if cfg.model_type not in SUPPORTED_TYPES:
        raise PreviewError(
            f"model type {cfg.model_type!r} is not supported by the preview; supported: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return processor, model.to(device).eval()


def messages(media: list[Any], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "video"} if isinstance(m, bytes) else {"type": "image"} for m in media
    ]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def prompt_text_embeds(processor: Any, model: Any, prompt: str) -> torch.Tensor | None:
    """Embeddings of the text tokens text-conditioned scorers get (the server's rule,
    ``docs/worker-safety.md``): the chat message holding the media (placeholders not expanded),
    between the nearest non-media special tokens around the first media token, media tokens
    removed, last 256."""
    tok = processor.tokenizer
    cfg = model.config
    media = set()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "image_token_index", "video_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            media.add(value)
    boundary = set(tok.all_special_ids) - media
    all_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    first = next((i for i, t in enumerate(all_ids) if t in media), None)
    if first is None:
        return None
    lo = max((i + 1 for i in range(first) if all_ids[i] in boundary), default=0)
    hi = next((i for i in range(first, len(all_ids)) if all_ids[i] in boundary), len(all_ids))
    ids = [t for t in all_ids[lo:hi] if t not in media][-MAX_TEXT_TOKENS:]
    if not ids:
        return None
    emb = model.get_input_embeddings()
    return emb(torch.tensor(ids, device=emb.weight.device))


@torch.no_grad()
def prepare(model_dir: str, media: list[Any], text: str, *, dtype: str = "float32",
            device: str = "cpu") -> Prepared:
    """Run the processor and vision tower on ``media`` (PIL images and mp4 bytes, in prompt
    order) under a chat prompt with ``text``."""
    processor, model = load(str(model_dir), dtype, device)
    model_type = model.config.model_type
    if model_type in LLAVA_TYPES and any(isinstance(m, bytes) for m in media):
        raise PreviewError(f"{model_type} models take images only, not video")
    prompt = processor.apply_chat_template(messages(media, text), tokenize=False,
                                           add_generation_prompt=True)
    text_embeds = prompt_text_embeds(processor, model, prompt)
    if model_type in QWEN_TYPES:
        inputs, items = _qwen(processor, model, media, prompt)
    else:
        inputs, items = _llava(processor, model, media, prompt)
    return Prepared(model_type, processor, model, prompt, inputs, items, text_embeds, media)


def select(prep: Prepared, item: Item, ratio: float, method: str,
           config: TokenPruneConfig | None = None, keep: int | None = None) -> torch.Tensor:
    """Kept rows of ``item.feat`` (ascending, always-kept rows included), as the server
    selects them at ``ratio`` with ``method`` under the ``token_prune`` block ``config``
    (``keep``: the item's count when a budget decided it, docs/budgets.md)."""
    config = config or TokenPruneConfig()
    n = item.num_tokens
    k = num_kept(n, ratio, config.min_keep) if keep is None else int(keep)
    rows = item.feat.shape[0]
    if k >= n:
        return torch.arange(rows)
    text = prep.text_embeds if get_method(method).uses_text else None
    feat = item.feat.index_select(0, item.scored.to(item.feat.device))
    idx = select_tokens(feat, k, method, grid=item.grid, text_embeds=text,
                        **config.options_for(method)).cpu()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[item.scored] = False
    keep[item.scored[idx]] = True
    return keep.nonzero().flatten()


def kept_scored(item: Item, kept_rows: torch.Tensor) -> torch.Tensor:
    """Which of the item's scored tokens are in ``kept_rows`` (bool, (num_tokens,))."""
    mask = torch.zeros(item.feat.shape[0], dtype=torch.bool)
    mask[kept_rows] = True
    return mask[item.scored]


# --------------------------------------------------------------------------- families


def _qwen_call(processor: Any, media: list[Any], prompt: str,
               **kwargs: Any) -> tuple[Any, list[Any], list[Any]]:
    from transformers.video_utils import VideoMetadata

    from vllm_tokenprune.testing.media import decode_video

    images = [m for m in media if not isinstance(m, bytes)]
    videos, metadata, frames_of = [], [], []
    for m in media:
        if isinstance(m, bytes):
            frames, fps = decode_video(m)
            n = len(frames)
            videos.append(frames)
            frames_of.append(frames)
            metadata.append(VideoMetadata(total_num_frames=n, fps=fps, duration=n / fps,
                                          frames_indices=list(range(n)),
                                          video_backend="opencv"))
    inputs = processor(text=[prompt], images=images or None, videos=videos or None,
                       video_metadata=metadata or None, return_tensors="pt",
                       return_mm_token_type_ids=True, **kwargs)
    return inputs, images, frames_of


def raw_qwen_inputs(prep: Prepared) -> Any:
    """The Qwen-VL processor's output without rescaling and normalizing: what vLLM's API
    server gets when it normalizes on the device (``mm_device_do_normalize``)."""
    return _qwen_call(prep.processor, prep.media, prep.prompt, do_rescale=False,
                      do_normalize=False)[0]


def _qwen(processor: Any, model: Any, media: list[Any], prompt: str) -> tuple[Any, list[Item]]:
    inputs, images, frames_of = _qwen_call(processor, media, prompt)
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    cell = merge * cfg.vision_config.patch_size
    device = model.get_input_embeddings().weight.device
    deepstack = cfg.model_type == "qwen3_vl"
    items: list[Item] = []
    for modality, pixels, grid_key, token_id, sources in (
        ("image", "pixel_values", "image_grid_thw", cfg.image_token_id, images),
        ("video", "pixel_values_videos", "video_grid_thw", cfg.video_token_id, frames_of),
    ):
        if pixels not in inputs:
            continue
        get = model.model.get_image_features if modality == "image" \
            else model.model.get_video_features
        out = get(inputs[pixels].to(device), inputs[grid_key].to(device), return_dict=True)
        levels = list(zip(*out.deepstack_features, strict=True)) if deepstack else None
        for i, feat in enumerate(out.pooler_output):
            t, gh, gw = (int(x) for x in inputs[grid_key][i])
            grid = (t, gh // merge, gw // merge)
            h, w = grid[1], grid[2]
            if modality == "image":
                panels = [Panel(sources[i].convert("RGB").resize((w * cell, h * cell)), h, w, 0)]
            else:
                frames = sources[i]
                panels = []
                for j in range(t):
                    f = frames[min(len(frames) - 1, round(j * len(frames) / t))]
                    img = Image.fromarray(np.asarray(f)).convert("RGB")
                    panels.append(Panel(img.resize((w * cell, h * cell)), h, w, j * h * w,
                                        f"frame group {j}"))
            items.append(Item(modality, feat, torch.arange(feat.shape[0]), grid, token_id,
                              panels, levels[i] if levels else None))
    return inputs, items


def _to_pil(pixels: torch.Tensor, mean: Any, std: Any) -> Image.Image:
    arr = pixels.float().cpu().numpy().transpose(1, 2, 0)
    arr = arr * np.asarray(std) + np.asarray(mean)
    return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))


def _llava(processor: Any, model: Any, images: list[Any], prompt: str) -> tuple[Any, list[Item]]:
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    cfg = model.config
    device = model.get_input_embeddings().weight.device
    next_style = cfg.model_type == "llava_next"
    kwargs = {"image_sizes": inputs["image_sizes"]} if next_style else {}
    feats = model.model.get_image_features(
        inputs["pixel_values"].to(device), vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True,
        **kwargs).pooler_output
    token_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    ip = processor.image_processor
    mean, std = ip.image_mean, ip.image_std
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    items: list[Item] = []
    for i, feat in enumerate(feats):
        if next_style:
            newline = (feat == model.model.image_newline.to(feat.dtype)).all(dim=-1).cpu()
            scored = (~newline).nonzero().flatten()
            panels = _llava_next_panels(cfg, inputs["pixel_values"][i],
                                        [int(v) for v in inputs["image_sizes"][i]],
                                        side, int(newline.sum()), scored.numel(), mean, std)
            items.append(Item("image", feat, scored, None, token_id, panels))
        else:
            square = feat.shape[0] == side * side
            panels = [Panel(_to_pil(inputs["pixel_values"][i], mean, std), side, side, 0)] \
                if square else []
            items.append(Item("image", feat, torch.arange(feat.shape[0]),
                              (1, side, side) if square else None, token_id, panels))
    return inputs, items


def _llava_next_panels(cfg: Any, pixels: torch.Tensor, image_size: list[int], side: int,
                       rows: int, num_scored: int, mean: Any, std: Any) -> list[Panel]:
    """The base image (side x side tokens), then the stitched tiles cut to their unpadded
    ``rows`` x ``width`` token grid (as transformers' ``unpad_image`` cuts the features)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    size = cfg.vision_config.image_size
    panels = [Panel(_to_pil(pixels[0], mean, std), side, side, 0, "base image")]
    if rows == 0:
        return panels
    width = (num_scored - side * side) // rows
    gh, gw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, size)
    tiles = [_to_pil(p, mean, std) for p in pixels[1:1 + gh * gw]]
    stitched = Image.new("RGB", (gw * size, gh * size))
    for k, tile in enumerate(tiles):
        stitched.paste(tile, ((k % gw) * size, (k // gw) * size))
    scale = size / side
    top = int(((gh * side - rows) // 2) * scale)
    left = int(((gw * side - width) // 2) * scale)
    crop = stitched.crop((left, top, left + round(width * scale), top + round(rows * scale)))
    panels.append(Panel(crop, rows, width, side * side, f"{gh}x{gw} tiles"))
    return panels
