"""``auto``'s count for an image, straight from a HF image processor (preview, benchmarks, tests).

Runs in whatever process calls it (the API server's processor uses :mod:`.grids` and
:mod:`.auto` on the outputs it already has; this module runs the HF image processor itself).
No vLLM import.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vllm_tokenprune.budget.auto import (
    AutoEstimate,
    AutoOptions,
    Reader,
    auto_options,
    estimate_keep,
    reader,
)
from vllm_tokenprune.budget.grids import TokenGrid, as_numpy, patch_token_view, qwen_token_view

__all__ = ["auto_count", "estimate_image", "pixel_scale", "processor_kind", "token_grid"]


def pixel_scale(image_processor: Any, *, do_rescale: bool | None = None,
                do_normalize: bool | None = None) -> list[float] | float | None:
    """What turns the processor's ``pixel_values`` back into ``[0, 1]`` brightness steps (the
    ``image_std`` argument of :mod:`.grids`), given whether it rescaled and normalized (None:
    the processor's own setting). vLLM normalizes Qwen-VL pixels on the device
    (``mm_device_do_normalize``, its default for those families): the API server's processor
    then runs with ``do_rescale=False, do_normalize=False`` and its pixels are raw 0..255."""
    rescale = getattr(image_processor, "do_rescale", True) if do_rescale is None else do_rescale
    normalize = (getattr(image_processor, "do_normalize", True) if do_normalize is None
                 else do_normalize)
    factor = 1.0 if rescale else float(getattr(image_processor, "rescale_factor", 1 / 255))
    if not normalize:
        return factor
    std = getattr(image_processor, "image_std", None)
    if std is None:
        return factor
    return [float(v) * factor for v in (std if isinstance(std, (list, tuple)) else [std] * 3)]


def processor_kind(image_processor: Any) -> str:
    """``"qwen"`` (flattened merged patches), ``"llava_next"`` (any-resolution tiles) or
    ``"llava"`` (one CLIP tile)."""
    if hasattr(image_processor, "merge_size") and hasattr(image_processor, "temporal_patch_size"):
        return "qwen"
    if getattr(image_processor, "image_grid_pinpoints", None):
        return "llava_next"
    return "llava"


def _listed(x: Any) -> list[Any]:
    return x.tolist() if hasattr(x, "tolist") else list(x)  # one call for a tensor


def token_grid(hf_out: Mapping[str, Any], image_processor: Any, opts: AutoOptions,
               index: int = 0, patch_size: int = 14, modality: str = "image",
               scale: list[float] | float | None = None) -> TokenGrid:
    """The token grid of item ``index`` of a HF image (or, Qwen-VL, ``modality="video"``:
    video) processor's output, not yet read (:class:`~vllm_tokenprune.budget.grids.TokenGrid`:
    :func:`~vllm_tokenprune.budget.auto.estimate_keep` reads only the tokens it needs; ``.tensor()``
    reads all); ``scale``: :func:`pixel_scale` (default: the processor's ``image_std``, for its
    normalized output)."""
    kind = processor_kind(image_processor)
    std = getattr(image_processor, "image_std", None) if scale is None else scale
    if modality not in ("image", "video") or (modality == "video" and kind != "qwen"):
        raise ValueError(f"no {modality!r} token grid for a {kind} processor")
    pv: Tensor = hf_out["pixel_values" if modality == "image" else "pixel_values_videos"]
    channel = opts.channel
    if kind == "qwen":
        grids = _listed(hf_out[f"{modality}_grid_thw"])  # one call, no tensors
        start = sum(t * h * w for t, h, w in grids[:index])
        return qwen_token_view(as_numpy(pv), grids[index],
                               patch_size=int(image_processor.patch_size),
                               merge_size=int(image_processor.merge_size),
                               temporal_patch_size=int(image_processor.temporal_patch_size),
                               samples=opts.samples, sample_rows=opts.sample_rows,
                               image_std=std, channel=channel, start=start)
    x = as_numpy(pv)  # (B, C, H, W), LLaVA-NeXT (B, T, C, H, W): the item's tiles from a whole
    per_item = 1 if x.ndim == 4 else x.shape[1]
    count = per_item
    if kind == "llava_next" and "image_sizes" in hf_out:
        # The processor pads the batch to its largest tile count with zero tiles; keep this
        # image's own (1 base + the any-resolution grid's tiles).
        count = _next_tiles(_listed(hf_out["image_sizes"])[index], image_processor)
    return patch_token_view(x.reshape(-1, *x.shape[-3:]), patch_size=patch_size,
                            samples=opts.samples, sample_rows=opts.sample_rows, image_std=std,
                            channel=channel, first=index * per_item, count=count)


#: Readers by processor-output layout (:func:`auto_count`): key -> (the processor, weakly; the
#: reader, its offsets into the whole flat pixel array). The 64 latest used; the lock keeps the
#: order's updates whole where processors run in threads (the readers themselves are
#: read-only).
_READERS: OrderedDict[tuple[Any, ...], tuple[weakref.ref[Any], Reader]] = OrderedDict()
_KEPT = 64
_LOCK = threading.Lock()


def auto_count(hf_out: Mapping[str, Any], image_processor: Any, opts: AutoOptions,
               index: int = 0, patch_size: int = 14, modality: str = "image",
               scale: list[float] | float | None = None, num_tokens: int | None = None,
               min_keep: int = 1) -> AutoEstimate:
    """``estimate_keep(token_grid(...))`` of item ``index`` (the same count), as the API
    server's processor runs it: the :class:`~vllm_tokenprune.budget.auto.Reader` of the
    output's layout is kept, so an image of a layout seen before costs a look-up, one gather
    from the pixels and a few matrix products (``docs/budgets.md``, "Cost"). ``scale``:
    :func:`pixel_scale`.

    The layout's key: the processor (by identity, checked through a weak reference), the
    pixels' shape and dtype, the item's place (Qwen-VL: the grids up to it; LLaVA-NeXT: its
    image size), the options, the factor to pixel units."""
    pv: Tensor = hf_out["pixel_values" if modality == "image" else "pixel_values_videos"]
    grids = hf_out[f"{modality}_grid_thw"] if f"{modality}_grid_thw" in hf_out else None
    sizes = hf_out["image_sizes"] if modality == "image" and "image_sizes" in hf_out else None
    key = (id(image_processor), modality, index, patch_size, opts,
           tuple(scale) if isinstance(scale, list) else scale, tuple(pv.shape), pv.dtype,
           None if grids is None else tuple(map(tuple, _listed(grids)[: index + 1])),
           None if sizes is None else tuple(_listed(sizes)[index]))
    with _LOCK:
        entry = _READERS.get(key)
        if entry is not None:
            _READERS.move_to_end(key)
    if entry is not None and entry[0]() is image_processor:
        return entry[1].estimate(as_numpy(pv), num_tokens, min_keep)  # take reads it flat
    grid = token_grid(hf_out, image_processor, opts, index, patch_size, modality, scale)
    found = reader(grid, opts, modality == "video")  # offsets into the whole output's pixels
    try:
        ref = weakref.ref(image_processor)
    except TypeError:  # not weakly referable: no reader kept
        pass
    else:
        with _LOCK:
            _READERS[key] = (ref, found)
            while len(_READERS) > _KEPT:
                _READERS.popitem(last=False)
    return found.estimate(grid.source, num_tokens, min_keep)


def _next_tiles(image_size: Any, image_processor: Any) -> int:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    crop = image_processor.crop_size
    side = int(crop["height"] if isinstance(crop, Mapping) else crop.height)
    h, w = (int(v) for v in image_size)
    gh, gw = get_anyres_image_grid_shape((h, w), image_processor.image_grid_pinpoints, side)
    return 1 + gh * gw


def estimate_image(image: Any, image_processor: Any,
                   options: Mapping[str, Any] | AutoOptions | None = None, *,
                   num_tokens: int | None = None, min_keep: int = 1,
                   patch_size: int = 14, **processor_kwargs: Any) -> AutoEstimate:
    """``auto``'s estimate for one PIL image, run through ``image_processor`` (with
    ``processor_kwargs``). ``num_tokens`` defaults to the rows read (exact for Qwen-VL and
    LLaVA-1.5; LLaVA-NeXT's unpadded N is the caller's to give)."""
    opts = auto_options(options)
    out = image_processor(images=[image], return_tensors="pt", **processor_kwargs)
    grid = token_grid(out, image_processor, opts, 0, patch_size)
    return estimate_keep(grid, num_tokens, opts, min_keep=min_keep)
