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

Budgets (docs/budgets.md) count as on the server: ``ratio="auto"`` (each item's count from its
pixels), ``detail=["low", None]`` (per image, as ``image_url.detail``) and
``max_visual_tokens=N``; each item's ``why`` says which decided its count.
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
    why: str = "ratio"


@dataclass
class PreviewResult:
    method: str
    ratios: dict[str, float | str]
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
                          "kept": it.kept, "why": it.why, "kept_indices": it.kept_indices,
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


def _select_all(prep: Prepared, method: str, ratios: Mapping[str, float | str],
                config: TokenPruneConfig, detail: Sequence[str | None] | None = None,
                max_visual_tokens: int | None = None) -> list[ItemResult]:
    counts = _counts(prep, method, ratios, config, detail, max_visual_tokens)
    out = []
    for item, (keep, why) in zip(prep.items, counts, strict=True):
        ratio = ratios[item.modality]
        rows = select(prep, item, 0.0 if isinstance(ratio, str) else ratio, method, config,
                      keep)
        kept = kept_scored(item, rows)
        out.append(ItemResult(item.modality, item.num_tokens, int(kept.sum()),
                              kept.nonzero().flatten().tolist(), rows.tolist(), item.grid, why))
    return out


def _counts(prep: Prepared, method: str, ratios: Mapping[str, float | str],
            config: TokenPruneConfig, detail: Sequence[str | None] | None,
            cap: int | None) -> list[tuple[int, str]]:
    """Each item's ``(count, why)`` by the server's rule (:func:`vllm_tokenprune.plan.
    item_counts`), ``auto``'s estimate from the same processor output the server reads."""
    from vllm_tokenprune.budget import auto_options, estimate_keep, token_grid
    from vllm_tokenprune.config import DETAIL_KEY, RequestFieldError
    from vllm_tokenprune.plan import item_counts, resolve_request

    fields: dict[str, Any] = {"prune_ratio": ratios["image"],
                              "video_prune_ratio": ratios["video"], "prune_method": method}
    if detail:
        fields[DETAIL_KEY] = [None if d == "auto" else d for d in detail]
    if cap is not None:
        fields["max_visual_tokens"] = cap
    try:
        request = resolve_request(config, fields)
    except RequestFieldError as e:
        raise PreviewError(str(e)) from None
    opts = auto_options(config.auto)
    seen: dict[str, int] = {}
    items = []
    for item in prep.items:
        index = seen.get(item.modality, 0)
        seen[item.modality] = index + 1
        estimate = None
        if request[item.modality].auto and request.detail(item.modality, index) != "high":
            proc = prep.processor
            sub = getattr(proc, f"{item.modality}_processor", None) or proc.image_processor
            patch = int(getattr(prep.model.config.vision_config, "patch_size", 14))
            grid = token_grid(_server_pixels(prep), sub, opts, index, patch, item.modality,
                              _server_scale(prep, sub))
            estimate = estimate_keep(grid, item.num_tokens, opts, min_keep=config.min_keep,
                                     video=item.modality == "video").num_keep
        items.append((item.modality, index, item.num_tokens, estimate))
    try:
        return item_counts(request, items, config.min_keep)
    except ValueError as e:
        raise PreviewError(str(e)) from None


#: Families whose pixels vLLM normalizes on the device by default (``mm_device_do_normalize``):
#: its API server's processor hands on raw 0..255 pixels, which ``auto`` then reads.
_DEVICE_NORMALIZED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _server_pixels(prep: Prepared) -> Any:
    """The processor output the server's ``auto`` reads (raw pixels where vLLM normalizes on
    the device), so the preview's counts are the server's to the bit."""
    if prep.model_type not in _DEVICE_NORMALIZED:
        return prep.inputs
    cached = getattr(prep, "_raw_inputs", None)
    if cached is None:
        from vllm_tokenprune.preview._extract import raw_qwen_inputs

        cached = raw_qwen_inputs(prep)
        prep._raw_inputs = cached  # type: ignore[attr-defined]
    return cached


def _server_scale(prep: Prepared, sub: Any) -> Any:
    from vllm_tokenprune.budget import pixel_scale

    if prep.model_type in _DEVICE_NORMALIZED:
        return pixel_scale(sub, do_rescale=False, do_normalize=False)
    return pixel_scale(sub)


def _ratios(ratio: float | str, video_ratio: float | str | None) -> dict[str, float | str]:
    for r in (ratio, video_ratio):
        if r is not None and r != "auto" and not (
                isinstance(r, (int, float)) and 0.0 <= r < 1.0):
            raise PreviewError(f"ratio must be in [0, 1) or 'auto', got {r}")
    return {"image": ratio, "video": ratio if video_ratio is None else video_ratio}


def preview(model: str | Path, media: Sequence[Any], method: str | None = None,
            ratio: float | str | None = None, *, prompt: str = DEFAULT_PROMPT,
            video_ratio: float | str | None = None,
            detail: Sequence[str | None] | None = None, max_visual_tokens: int | None = None,
            hf_overrides: Mapping[str, Any] | str | None = None, dtype: str = "float32",
            device: str = "cpu") -> PreviewResult:
    """The kept tokens of each media item, as the server selects them. ``method``/``ratio``
    default to the server's (``token_prune`` block; ``"auto"`` allowed); ``media``: paths,
    URLs, PIL images or mp4 bytes, in prompt order; ``detail``: per image, as its
    ``image_url.detail``; ``max_visual_tokens``: the request's cap (default: the server's)."""
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
    return PreviewResult(method, used, _select_all(prep, method, ratios, config, detail,
                                                   max_visual_tokens), prep)


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
                ratios: Sequence[float | str], *, prompt: str = DEFAULT_PROMPT,
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
    return draw.grid(cells, list(methods),
                     [f"ratio {r}" if isinstance(r, str) else f"ratio {r:g}" for r in ratios],
                     title=f"{Path(str(model)).name}: kept tokens bright, dropped dimmed")
