"""See which visual tokens a served model keeps: ``python -m vllm_tokenprune.preview``.

The preview runs the model's own processor, vision tower and projector with transformers (the
weights the server loads; CPU or GPU) and the plugin's scorers with the server's
``token_prune`` block (from the model's config, overridden like ``--hf-overrides``), so the
kept set it reports is the one the server keeps for the same image, prompt, method and ratio
(tests/_suite.py checks that against real servers). Python API::

    from vllm_tokenprune.preview import preview, render, render_grid
    result = preview("Qwen/Qwen2.5-VL-7B-Instruct", ["photo.jpg"], method="lrcp", ratio=0.889)
    result.items[0].tokens, result.items[0].kept   # 2691 299
    render(result).save("kept.png")
    render_grid("Qwen/Qwen2.5-VL-7B-Instruct", ["photo.jpg"], ["lrcp", "random"],
                [0.75, 0.889]).save("grid.png")
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vllm_tokenprune.config import TokenPruneConfig, TokenPruneConfigError, parse_config
from vllm_tokenprune.preview import draw
from vllm_tokenprune.preview._extract import (
    SUPPORTED_TYPES,
    Item,
    Prepared,
    PreviewError,
    kept_scored,
    prepare,
    select,
)

__all__ = ["SUPPORTED_TYPES", "ItemResult", "PreviewError", "PreviewResult", "load_media",
           "preview", "render", "render_grid", "server_config"]

DEFAULT_PROMPT = "Describe this image."
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass
class ItemResult:
    """One media item: ``tokens`` the scorer chose from, ``kept`` of them; ``kept_indices``
    into the scored tokens (LLaVA-NeXT: newline tokens excluded), ``kept_rows`` into the
    item's placeholder rows (newlines included)."""

    modality: str
    tokens: int
    kept: int
    kept_indices: list[int]
    kept_rows: list[int]
    grid: tuple[int, int, int] | None


@dataclass
class PreviewResult:
    method: str
    ratios: dict[str, float]
    items: list[ItemResult]
    prepared: Prepared

    def to_json(self) -> dict[str, Any]:
        """The same shape as the server's ``token_prune`` response field, plus indices."""
        seen: dict[str, int] = {}
        items = []
        for it in self.items:
            index = seen.get(it.modality, 0)
            seen[it.modality] = index + 1
            items.append({"modality": it.modality, "index": index, "tokens": it.tokens,
                          "kept": it.kept, "kept_indices": it.kept_indices,
                          "grid": list(it.grid) if it.grid else None})
        return {"method": self.method, "ratios": self.ratios,
                "tokens": sum(i.tokens for i in self.items),
                "kept": sum(i.kept for i in self.items), "items": items}


def server_config(model: str, hf_overrides: Mapping[str, Any] | str | None = None
                  ) -> TokenPruneConfig:
    """The ``token_prune`` block the server would use: the model config's, with
    ``hf_overrides`` (the dict or JSON string given to ``vllm serve --hf-overrides``) on top."""
    from transformers import AutoConfig

    if isinstance(hf_overrides, str):
        try:
            hf_overrides = json.loads(hf_overrides)
        except ValueError as e:
            raise PreviewError(f"--hf-overrides is not valid JSON: {e}") from None
    try:
        hf_config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise PreviewError(f"cannot load a model config from {model!r}: {e}") from None
    if hf_config.model_type not in SUPPORTED_TYPES:
        raise PreviewError(
            f"model type {hf_config.model_type!r} is not supported by the preview; supported: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    block = (hf_overrides or {}).get("token_prune")
    if block is None:
        block = getattr(hf_config, "token_prune", None)
    try:
        return parse_config(block)
    except TokenPruneConfigError as e:
        raise PreviewError(str(e)) from None


def load_media(source: str | Path | Image.Image | bytes) -> Image.Image | bytes:
    """A PIL image, or mp4 bytes for a video, from a path, an http(s) URL or a value."""
    if isinstance(source, (Image.Image, bytes)):
        return source
    name = str(source)
    try:
        if name.startswith(("http://", "https://")):
            with urllib.request.urlopen(name, timeout=60) as r:
                data = r.read()
        else:
            data = Path(name).read_bytes()
    except OSError as e:
        raise PreviewError(f"cannot read media {name!r}: {e}") from None
    if name.lower().split("?")[0].endswith(_VIDEO_SUFFIXES):
        return data
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises several types for bad data
        raise PreviewError(f"cannot read image {name!r}: {e}") from None
    return image.convert("RGB")


def _select_all(prep: Prepared, method: str, ratios: dict[str, float],
                config: TokenPruneConfig) -> list[ItemResult]:
    out = []
    for item in prep.items:
        rows = select(prep, item, ratios[item.modality], method, config)
        kept = kept_scored(item, rows)
        out.append(ItemResult(item.modality, item.num_tokens, int(kept.sum()),
                              kept.nonzero().flatten().tolist(), rows.tolist(), item.grid))
    return out


def _ratios(ratio: float, video_ratio: float | None) -> dict[str, float]:
    for r in (ratio, video_ratio):
        if r is not None and not 0.0 <= r < 1.0:
            raise PreviewError(f"ratio must be in [0, 1), got {r}")
    return {"image": ratio, "video": ratio if video_ratio is None else video_ratio}


def preview(model: str | Path, media: Sequence[Any], method: str | None = None,
            ratio: float | None = None, *, prompt: str = DEFAULT_PROMPT,
            video_ratio: float | None = None,
            hf_overrides: Mapping[str, Any] | str | None = None, dtype: str = "float32",
            device: str = "cpu") -> PreviewResult:
    """The kept tokens of each media item, as the server selects them. ``method``/``ratio``
    default to the server's (``token_prune`` block); ``media``: paths, URLs, PIL images or
    mp4 bytes, in prompt order."""
    config = server_config(str(model), hf_overrides)
    method = method or config.method
    if not config.is_allowed(method):
        raise PreviewError(f"method {method!r} is not in the server's allowed_methods")
    ratios = _ratios(config.prune_ratio if ratio is None else ratio,
                     video_ratio if ratio is not None or video_ratio is not None
                     else config.video_prune_ratio)
    prep = prepare(str(model), [load_media(m) for m in media], prompt, dtype=dtype,
                   device=device)
    used = {it.modality: ratios[it.modality] for it in prep.items}
    return PreviewResult(method, used, _select_all(prep, method, ratios, config), prep)


def _item_picture(item: Item, kept: Sequence[int]) -> Image.Image:
    mask = torch.zeros(item.num_tokens, dtype=torch.bool)
    mask[list(kept)] = True
    pictures = [draw.labelled(draw.overlay(p.image, mask[p.offset:p.offset + p.h * p.w],
                                           p.h, p.w), p.label)
                for p in item.panels]
    if not pictures:
        raise PreviewError("no drawable layout for this item")
    return draw.hstack(pictures)


def render(result: PreviewResult) -> Image.Image:
    """The result's items side by side, kept tokens bright and dropped ones dimmed."""
    pictures = [_item_picture(item, r.kept_indices)
                for item, r in zip(result.prepared.items, result.items, strict=True)]
    return draw.hstack(pictures, gap=12)


def render_grid(model: str | Path, media: Sequence[Any], methods: Sequence[str],
                ratios: Sequence[float], *, prompt: str = DEFAULT_PROMPT,
                hf_overrides: Mapping[str, Any] | str | None = None, dtype: str = "float32",
                device: str = "cpu", progress: bool | Callable[..., Any] = False) -> Image.Image:
    """Methods (rows) x ratios (columns) in one picture. The vision tower runs once."""
    config = server_config(str(model), hf_overrides)
    prep = prepare(str(model), [load_media(m) for m in media], prompt, dtype=dtype,
                   device=device)
    jobs = [(m, r) for m in methods for r in ratios]
    it: Any = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="scoring", unit="cell")
    pictures = {}
    for m, r in it:
        results = _select_all(prep, m, _ratios(r, None), config)
        pictures[m, r] = draw.hstack([_item_picture(item, res.kept_indices)
                                      for item, res in zip(prep.items, results, strict=True)],
                                     gap=12)
    cells = [[pictures[m, r] for r in ratios] for m in methods]
    return draw.grid(cells, list(methods), [f"ratio {r:g}" for r in ratios],
                     title=f"{Path(str(model)).name}: kept tokens bright, dropped dimmed")
