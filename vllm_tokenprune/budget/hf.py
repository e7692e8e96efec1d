"""``auto``'s count on a HF image processor's output: :class:`AutoCounter` (the API server's
multimodal processor keeps one per modality and counts the outputs it already has),
:func:`auto_count` (the same, a counter kept per processor: benchmarks, tests) and
:func:`estimate_image` (runs the HF image processor itself: preview).

Runs in whatever process calls it (the API server for the counter). No vLLM import.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from vllm_tokenprune.budget.auto import (
    AutoEstimate,
    AutoOptions,
    Reader,
    auto_options,
    count_pass,
    estimate_keep,
    layout_reader,
    pass_reader,
    pass_values,
    plan_windows,
    reader,
    uses_kernel,
)
from vllm_tokenprune.budget.grids import (
    TokenGrid,
    as_numpy,
    check_qwen_item,
    packed_index,
    patch_token_view,
    qwen_sampling,
    qwen_token_view,
)

__all__ = ["AutoCounter", "auto_count", "estimate_image", "pixel_scale", "processor_kind",
           "token_grid"]


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
    return _grid(*_read(hf_out, modality), image_processor, opts, index, patch_size, modality,
                 scale)


def _read(hf_out: Mapping[str, Any], modality: str
          ) -> tuple[np.ndarray, list[Any] | None, list[Any] | None]:
    """The output's pixels of ``modality`` as numpy (their memory), its grids (Qwen-VL) and
    image sizes (LLaVA-NeXT) as lists: each tensor read once per count."""
    pv: Tensor = hf_out["pixel_values" if modality == "image" else "pixel_values_videos"]
    key = f"{modality}_grid_thw"
    grids = _listed(hf_out[key]) if key in hf_out else None
    sizes = (_listed(hf_out["image_sizes"]) if modality == "image" and "image_sizes" in hf_out
             else None)
    return as_numpy(pv), grids, sizes


def _grid(x: np.ndarray, grids: list[Any] | None, sizes: list[Any] | None,
          image_processor: Any, opts: AutoOptions, index: int, patch_size: int, modality: str,
          scale: list[float] | float | None) -> TokenGrid:
    kind = processor_kind(image_processor)
    std = getattr(image_processor, "image_std", None) if scale is None else scale
    if modality not in ("image", "video") or (modality == "video" and kind != "qwen"):
        raise ValueError(f"no {modality!r} token grid for a {kind} processor")
    channel = opts.channel
    if kind == "qwen":
        if grids is None:
            raise KeyError(f"{modality}_grid_thw")
        start = sum(t * h * w for t, h, w in grids[:index])
        return qwen_token_view(x, grids[index],
                               patch_size=int(image_processor.patch_size),
                               merge_size=int(image_processor.merge_size),
                               temporal_patch_size=int(image_processor.temporal_patch_size),
                               samples=opts.samples, sample_rows=opts.sample_rows,
                               image_std=std, channel=channel, start=start)
    # (B, C, H, W), LLaVA-NeXT (B, T, C, H, W): the item's tiles from a whole output
    per_item = 1 if x.ndim == 4 else x.shape[1]
    count = per_item
    if kind == "llava_next" and sizes is not None:
        # The processor pads the batch to its largest tile count with zero tiles; keep this
        # image's own (1 base + the any-resolution grid's tiles).
        count = _next_tiles(sizes[index], image_processor)
    return patch_token_view(x.reshape(-1, *x.shape[-3:]), patch_size=patch_size,
                            samples=opts.samples, sample_rows=opts.sample_rows, image_std=std,
                            channel=channel, first=index * per_item, count=count)


#: Readers a counter keeps (the latest made), each with its gather offsets: 75 KiB at 588
#: Qwen-VL tokens, at most 0.5 MiB (64 windows of 64 tokens, 16 values).
_KEPT = 64


class AutoCounter:
    """``auto``'s count for the items of one HF processor's outputs, with fixed options, patch
    size, modality and factor to pixel units (``scale``: :func:`pixel_scale`): the API server
    keeps one per modality (``models/processor.py``), :func:`auto_count` one per processor and
    arguments.

    It keeps a :class:`~vllm_tokenprune.budget.auto.Reader` per output layout (the pixels'
    shape and the item's place: Qwen-VL its patch grid and first row, LLaVA-NeXT its image
    size), the :data:`_KEPT` latest made (a look-up is one dict read: cold after the
    processor, every call counts). With the compiled pass (:mod:`.kernel`, where numba is
    installed; compiled or loaded when the counter is made) a Qwen-VL item is counted with
    nothing made or kept per layout (:func:`~vllm_tokenprune.budget.auto.count_pass`), and a
    reader of LLaVA's tiles or of a window lattice is the layout's integers. Otherwise Qwen-VL's
    readers are made from pieces the counter keeps
    (its grids are packed: the offsets are a reordered slice of a kept
    :class:`~vllm_tokenprune.budget.grids.PackedIndex`), so the first image of a size costs
    less to read (``docs/budgets.md``, "Cost"); a window lattice (above ``max_windows``
    windows) and LLaVA's tiles get offsets made from their layout's strides."""

    def __init__(self, image_processor: Any, opts: AutoOptions, patch_size: int = 14,
                 modality: str = "image", scale: list[float] | float | None = None) -> None:
        self.processor = image_processor
        self.opts = opts
        self.patch_size = patch_size
        self.modality = modality
        self.scale = scale
        self._pixels = "pixel_values" if modality == "image" else "pixel_values_videos"
        self._frames = opts.window_frames if modality == "video" else 1
        self._readers: dict[tuple[Any, ...], Reader] = {}
        self._lock = threading.Lock()  # the readers' insertions and evictions
        self._qwen: tuple[Any, ...] | None = None
        self._pass: tuple[tuple[np.ndarray, int], tuple[float, ...]] | None = None
        compiled = uses_kernel(opts)  # the pass is built here (once per process), not in a count
        if processor_kind(image_processor) == "qwen":
            m, p, tp = (int(getattr(image_processor, k))
                        for k in ("merge_size", "patch_size", "temporal_patch_size"))
            std = getattr(image_processor, "image_std", None) if scale is None else scale
            offsets, factor, uniform = qwen_sampling(
                m, p, tp, 3, opts.samples, opts.sample_rows,
                tuple(std) if isinstance(std, (list, tuple)) else std, opts.channel)
            width = 3 * tp * p * p
            if compiled:  # the compiled pass: the layout's strides, no offsets
                self._pass = pass_values(offsets, factor, uniform)
            self._qwen = (f"{modality}_grid_thw", m, p, tp, width, offsets, factor, uniform,
                          None if self._pass is not None
                          else packed_index(m * m * width, offsets.tobytes()))

    def count(self, hf_out: Mapping[str, Any], index: int = 0, num_tokens: int | None = None,
              min_keep: int = 1) -> AutoEstimate:
        """``estimate_keep(token_grid(...))`` of item ``index`` of ``hf_out`` (the same count)
        through the kept reader of its layout."""
        qwen = self._qwen
        if qwen is None:
            pixels, grids, sizes = _read(hf_out, self.modality)
            key: tuple[Any, ...] = (pixels.shape, index,
                                    None if sizes is None else tuple(sizes[index]))
            found = self._readers.get(key)
            if found is None:
                grid = _grid(pixels, grids, sizes, self.processor, self.opts, index,
                             self.patch_size, self.modality, self.scale)
                found = self._keep(key, reader(grid, self.opts, self.modality == "video"))
            return found.estimate(pixels, num_tokens, min_keep)
        pixels = as_numpy(hf_out[self._pixels])
        grids = _listed(hf_out[qwen[0]])
        t, h, w = grids[index]
        start = sum(a * b * c for a, b, c in grids[:index]) if index else 0
        if self._pass is not None:  # the compiled pass: nothing made or kept per layout
            _, m, p, tp, width = qwen[:5]
            check_qwen_item(pixels.shape, (t, h, w), m, p, tp, 3, start)
            est = count_pass(pixels, (t, h // m, w // m), _qwen_strides(m, width, h, w),
                             start * width, *self._pass, self.opts, self._frames, num_tokens,
                             min_keep)
            if est is not None:
                return est  # else a lattice of windows: a kept reader below
        key = (pixels.shape, t, h, w, start)
        found = self._readers.get(key)
        if found is None:
            found = self._keep(key, self._qwen_reader(pixels, grids, index, start))
        return found.estimate(pixels, num_tokens, min_keep)

    def _qwen_reader(self, pixels: np.ndarray, grids: list[Any], index: int,
                     start: int) -> Reader:
        _, m, p, tp, width, offsets, factor, uniform, packed = self._qwen  # type: ignore[misc]
        t, h, w = (int(v) for v in grids[index])
        check_qwen_item(pixels.shape, (t, h, w), m, p, tp, 3, start)
        opts, video = self.opts, self.modality == "video"
        plan = plan_windows((t, h // m, w // m), opts.window, self._frames, opts.max_windows)
        if self._pass is not None:  # the compiled pass reads through the strides
            return pass_reader(plan, _qwen_strides(m, width, h, w), start * width, *self._pass,
                               opts)
        if plan.chosen is not None:  # a lattice: the offsets of its windows' tokens
            return reader(_grid(pixels, grids, None, self.processor, opts, index,
                                self.patch_size, self.modality, self.scale), opts, video)
        index = plan.packed_offsets(packed.rows(math.prod(plan.shape)), start * width)
        return layout_reader(plan, index, opts, len(offsets), factor, uniform)

    def _keep(self, key: tuple[Any, ...], found: Reader) -> Reader:
        with self._lock:
            self._readers[key] = found
            while len(self._readers) > _KEPT:  # the oldest made first
                self._readers.pop(next(iter(self._readers)), None)
        return found


def _qwen_strides(m: int, width: int, h: int, w: int) -> tuple[int, int, int]:
    """A Qwen-VL item's token strides (frame, row, column) in its flattened patch rows of
    ``width`` values, for its ``(h, w)`` patch grid: a token is ``m * m`` rows (as
    :func:`~vllm_tokenprune.budget.grids.qwen_token_view`'s)."""
    sx = m * m * width
    sy = (w // m) * sx
    return (h // m) * sy, sy, sx


#: Counters by (processor id, options, patch size, modality, scale) for :func:`auto_count`, the
#: 16 latest used (each holds its processor, so an id is not reused while it is kept).
_COUNTERS: OrderedDict[tuple[Any, ...], AutoCounter] = OrderedDict()
_LOCK = threading.Lock()


def auto_count(hf_out: Mapping[str, Any], image_processor: Any, opts: AutoOptions,
               index: int = 0, patch_size: int = 14, modality: str = "image",
               scale: list[float] | float | None = None, num_tokens: int | None = None,
               min_keep: int = 1) -> AutoEstimate:
    """``estimate_keep(token_grid(...))`` of item ``index`` (the same count), through the
    kept :class:`AutoCounter` of these arguments. ``scale``: :func:`pixel_scale`."""
    key = (id(image_processor), opts, patch_size, modality,
           tuple(scale) if isinstance(scale, list) else scale)
    with _LOCK:
        counter = _COUNTERS.get(key)
        if counter is not None and counter.processor is image_processor:
            _COUNTERS.move_to_end(key)
        else:
            counter = _COUNTERS[key] = AutoCounter(image_processor, opts, patch_size, modality,
                                                   scale)
            while len(_COUNTERS) > 16:
                _COUNTERS.popitem(last=False)
    return counter.count(hf_out, index, num_tokens, min_keep)


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
