"""Shared vLLM integration: the processor side and the model side of visual-token pruning.

Processor side (runs where vLLM preprocesses requests, the API server):

* resolves each media item's ``(prune_ratio, method)`` from the request's
  ``mm_processor_kwargs`` (put there by the endpoint plugin) or the server's ``token_prune``
  block, and computes the keep-count with :func:`vllm_tokenprune.num_kept` *before* the encoder
  runs: the prompt gets exactly the placeholder tokens of the pruned item;
* carries one row of ints per item to the model as a batched multimodal field
  (``<modality>_prune_params``, kept on CPU so reading it never syncs a device):
  ``[num_keep, method_id, num_tokens, t, h, w, *extra]`` (see :data:`PARAMS_HEAD`), where
  ``num_tokens`` is how many tokens the scorer chooses from, ``(t, h, w)`` their grid (``t = 0``:
  no grid) and ``extra`` whatever else the architecture's model side needs (LLaVA-NeXT: where
  its image-newline tokens sit);
* for text-conditioned methods, carries the prompt's text token ids too and mixes them into the
  item's cache hash, so the encoder cache never serves a selection made for another prompt.

Model side (runs in the worker, inside vLLM's batched encoder step): after the vision encoder
produced each item's embeddings, :meth:`TokenPruneModelMixin._tp_select` scores every item of the
batch (one batched scorer call per method) and the architecture keeps the selected rows in their
original order. Architectures with 1-D RoPE (LLaVA) need nothing more: kept tokens take
contiguous positions. For M-RoPE (Qwen-VL) the kept rows also carry their unpruned ``(t, h, w)``
positions, appended as extra channels, as vLLM's EVS video pruning does. The prompt's text
positions are laid out as in the unpruned prompt from the start
(:func:`mrope_positions_for_spans`), and vLLM's model runner hands each prefill step's
media rows back through ``SupportsMultiModalPruning.recompute_mrope_positions``, where the kept
tokens get their original positions (:meth:`TokenPruneModelMixin._tp_recompute_mrope_positions`).
That hook is vLLM's; the position fill is ours because vLLM's EVS helper
(``evs.recompute_mrope_positions``) misplaces tokens when one prefill chunk carries the end of
one item and the start of the next (seen with two images and ``--max-num-batched-tokens 96``).
Positions travel as base-256 digit pairs, so they survive bf16 exactly at any grid size.

A media item's placeholder is a *span*: the slots the model fills with embedding rows. Usually
all of them are visual tokens; a Qwen3-VL video's span also holds the timestamp text and frame
delimiters between frames (see :mod:`.qwen3_vl`). A pruned span keeps every non-visual slot and
the kept visual ones, in order, each at its unpruned position.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from vllm.logger import init_logger

from vllm_tokenprune.config import (
    REQUEST_FIELDS,
    TEXT_CONDITIONED_METHODS,
    TokenPruneConfig,
    config_from_hf_config,
    parse_request_fields,
)
from vllm_tokenprune.scoring import list_methods, num_kept, select_tokens_batch

logger = init_logger(__name__)

#: Stable method <-> integer id mapping used in the per-item tensor field.
METHOD_IDS: dict[str, int] = {m: i for i, m in enumerate(sorted(list_methods()))}
METHODS_BY_ID: dict[int, str] = {i: m for m, i in METHOD_IDS.items()}

#: Leading columns of a per-item params row: num_keep, method_id, num_tokens, t, h, w.
PARAMS_HEAD = 6
#: Items whose token counts the processor remembers for metrics of processor-cache hits.
_SEEN_ITEMS = 65536
#: Longest prompt text (in tokens, the last ones) handed to text-conditioned scorers.
MAX_TEXT_TOKENS = 256
#: Channels appended to each kept embedding row: its (t, h, w) position as base-256 digits.
POS_CHANNELS = 6

Grid = tuple[int, int, int]

_prompt_text_ids: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "tokenprune_prompt_text_ids", default=None
)


def params_key(modality: str) -> str:
    return f"{modality}_prune_params"


def text_key(modality: str) -> str:
    return f"{modality}_prune_text_ids"


class ItemLayout(NamedTuple):
    """What the processor knows about one media item before its encoder runs.

    ``num_tokens``: tokens the scorer chooses from; ``grid``: their (t, h, w) layout, or None;
    ``extra``: architecture-specific ints for the model side.
    """

    num_tokens: int
    grid: Grid | None = None
    extra: tuple[int, ...] = ()

    def row(self, num_keep: int, method_id: int) -> list[int]:
        t, h, w = self.grid or (0, 0, 0)
        return [num_keep, method_id, self.num_tokens, t, h, w, *self.extra]


class ItemParams(NamedTuple):
    """A params row as the model side reads it."""

    num_keep: int
    method: str
    num_tokens: int
    grid: Grid | None
    extra: tuple[int, ...]

    @classmethod
    def from_row(cls, row: Sequence[int]) -> ItemParams:
        t, h, w = (int(v) for v in row[3:6])
        return cls(int(row[0]), METHODS_BY_ID[int(row[1])], int(row[2]),
                   (t, h, w) if t > 0 else None, tuple(int(v) for v in row[PARAMS_HEAD:]))


# --------------------------------------------------------------------------- positions


def full_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """Unpruned M-RoPE positions of a (t, h, w) token grid, relative to the media start.

    Returns (t*h*w, 4) int64: columns t, h, w and, repeated on every row, the offset at which
    the text after the media starts (max position + 1), exactly as Qwen2/2.5-VL's
    ``get_mrope_input_positions`` lays an unpruned item out.
    """
    t_idx = (torch.arange(t, dtype=torch.float64) * t_factor).long()
    grid_t = t_idx.view(t, 1, 1).expand(t, h, w)
    grid_h = torch.arange(h).view(1, h, 1).expand(t, h, w)
    grid_w = torch.arange(w).view(1, 1, w).expand(t, h, w)
    nxt = max(int(t_idx[-1]), h - 1, w - 1) + 1
    pos = torch.stack([grid_t, grid_h, grid_w], dim=-1).reshape(-1, 3)
    return torch.cat([pos, torch.full((pos.shape[0], 1), nxt, dtype=torch.long)], dim=1)


def span_positions(token_ids: Sequence[int], frame_token_id: int, h: int, w: int) -> torch.Tensor:
    """Unpruned M-RoPE positions of a span of text tokens and (1, h, w) frames.

    Each run of ``frame_token_id`` is one or more frames of ``h*w`` tokens; every other token
    is text. Text tokens advance the position by one; a frame sits at the current position
    (t = 0, h and w offsets) and advances it by ``max(h, w)``: Qwen3-VL's layout of a video,
    whose frames are separated by timestamp text. Returns (len, 3) int64, relative to the
    span start.
    """
    grid = full_positions(1, h, w)[:, :3]
    out = torch.empty(len(token_ids), 3, dtype=torch.long)
    pos = i = 0
    n = len(token_ids)
    frame = h * w
    while i < n:
        if token_ids[i] == frame_token_id:
            if i + frame > n or any(t != frame_token_id for t in token_ids[i:i + frame]):
                raise ValueError("a frame's token run is shorter than h*w")
            out[i:i + frame] = grid + pos
            pos += max(h, w)
            i += frame
        else:
            out[i] = pos
            pos += 1
            i += 1
    return out


def row_separator_mask(length: int, base: int, rows: int, width: int) -> torch.Tensor:
    """(length,) bool, True at the separator slots of a media item laid out as ``base``
    tokens, then ``rows`` rows of ``width`` tokens each followed by one separator (LLaVA-NeXT:
    the base image, then the stitched tiles with an image-newline token after every row)."""
    if length != base + rows * (width + 1):
        raise RuntimeError(
            f"vllm-tokenprune: a media item has {length} rows, expected "
            f"{base} + {rows} * ({width} + 1)"
        )
    mask = torch.zeros(length, dtype=torch.bool)
    mask[base + width:: width + 1] = True
    return mask


def encode_positions(pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 3) int64 -> (n, 6) ``dtype``: each value as (value // 256, value % 256).

    Every digit is an integer in [0, 256), exact in bf16/fp16/fp32 alike.
    """
    if pos.numel() and int(pos.max()) >= 256 * 256:
        raise ValueError("media grid too large for position encoding (>= 65536)")
    return torch.cat([pos // 256, pos % 256], dim=1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(n, 6) float -> (3, n) int64, inverse of :func:`encode_positions`."""
    digits = channels.round().long()
    return (digits[:, :3] * 256 + digits[:, 3:]).permute(1, 0)


class MediaSpan(NamedTuple):
    """One media item's placeholder in a (pruned) prompt, for :func:`mrope_positions_for_spans`.

    ``offset``/``length``: where its placeholder tokens are; ``positions`` (>= length, 3): the
    unpruned relative positions of its slots (the first ``length`` serve as provisional
    positions until the model's ``recompute_mrope_positions`` fills in the real ones);
    ``next_offset``: where the text after the unpruned item starts, relative to the item.
    """

    offset: int
    length: int
    positions: torch.Tensor
    next_offset: int

    @classmethod
    def of_grid(cls, offset: int, length: int, t: int, h: int, w: int,
                t_factor: float = 1.0) -> MediaSpan:
        pos = full_positions(t, h, w, t_factor)
        return cls(offset, length, pos[:, :3], int(pos[0, 3]))

    @classmethod
    def of_positions(cls, offset: int, length: int, positions: torch.Tensor) -> MediaSpan:
        return cls(offset, length, positions, int(positions.max()) + 1)


# --------------------------------------------------------------------------- processor side


class TokenPruneProcessorMixin:
    """Mix into a ``BaseMultiModalProcessor`` subclass, before the vLLM class in the MRO.

    Per-architecture hooks: :meth:`_tp_item_layouts` (by default from ``<modality>_grid_thw``
    through :meth:`_tp_grid`) and :meth:`_tp_pruned_tokens` (by default the model's own
    placeholder replacement, one repeated token, cut to the keep-count).
    """

    info: Any

    # -- per-architecture hooks
    def _tp_grid(self, modality: str, item_grid: torch.Tensor) -> Grid:
        """The LM token grid of an item from its ``<modality>_grid_thw`` row."""
        raise NotImplementedError

    def _tp_item_layouts(self, modality: str, hf_out: Mapping[str, Any]) -> list[ItemLayout] | None:
        """One :class:`ItemLayout` per item of ``modality`` in the HF processor output (None:
        the output has no such items)."""
        grids = hf_out.get(f"{modality}_grid_thw")
        if grids is None:
            return None
        out = []
        for g in grids:
            t, h, w = self._tp_grid(modality, g)
            out.append(ItemLayout(t * h * w, (t, h, w)))
        return out

    def _tp_pruned_tokens(self, modality: str, full: list[int], params: ItemParams) -> list[int]:
        """The placeholder tokens of a pruned item, from the unpruned replacement ``full``."""
        if len(set(full)) != 1:
            raise NotImplementedError(
                "token pruning needs a replacement made of one repeated placeholder token"
            )
        if len(full) != params.num_tokens:
            raise RuntimeError(
                f"vllm-tokenprune: the {modality} placeholder has {len(full)} tokens but the "
                f"processor counted {params.num_tokens}"
            )
        return full[:1] * params.num_keep

    # -- config
    def _tp_config(self) -> TokenPruneConfig:
        cfg = getattr(self, "_tp_cfg", None)
        if cfg is None:
            cfg = config_from_hf_config(self.info.get_hf_config())
            self._tp_cfg = cfg
        return cfg

    def _tp_resolve(self, mm_kwargs: Mapping[str, object], modality: str) -> tuple[float, str]:
        """(ratio, method) for items of ``modality`` under these processor kwargs."""
        cfg = self._tp_config()
        fields = parse_request_fields(
            {k: v for k, v in mm_kwargs.items() if k in REQUEST_FIELDS}, cfg
        )
        method = str(fields.get("prune_method", cfg.method))
        ratio = fields.get("prune_ratio")
        if modality == "video" and "video_prune_ratio" in fields:
            ratio = fields["video_prune_ratio"]
        if ratio is None:
            ratio = cfg.ratio_for(modality)
        return float(ratio), method

    # -- vLLM hooks
    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        token = _prompt_text_ids.set(self._tp_text_ids(inputs.prompt))
        try:
            result = super().apply(inputs, *args, **kwargs)  # type: ignore[misc]
        finally:
            _prompt_text_ids.reset(token)
        self._tp_record(result, inputs.hf_processor_mm_kwargs)
        return result

    def _tp_record(self, result: Any, mm_kwargs: Mapping[str, object]) -> None:
        """Count this request's visual tokens (exact: the keep-counts are fixed here).

        Items served from vLLM's processor cache come back without their data (``None``), so
        each item's (method, tokens, kept) is remembered by its cache hash when first seen.
        """
        from vllm_tokenprune import metrics, response

        if metrics._frontend is None:
            return
        seen = getattr(self, "_tp_seen", None)
        if seen is None:
            seen = self._tp_seen = OrderedDict()
        items = []
        ratios = {}
        for modality, modality_items in result["mm_kwargs"].items():
            if modality not in ("image", "video") or not modality_items:
                continue
            ratios[modality], _ = self._tp_resolve(mm_kwargs, modality)
            hashes = result["mm_hashes"].get(modality, [])
            for i, item in enumerate(modality_items):
                key = hashes[i] if i < len(hashes) else None
                if item is not None:
                    if params_key(modality) not in item:
                        continue
                    p = ItemParams.from_row(item[params_key(modality)].data.tolist())
                    info = (p.method, p.num_tokens, p.num_keep)
                    if key is not None:
                        seen[key] = info
                        if len(seen) > _SEEN_ITEMS:
                            seen.popitem(last=False)
                else:
                    info = seen.get(key)
                    if info is None:
                        continue
                    seen.move_to_end(key)
                items.append((modality, *info))
        if items:
            _, method = self._tp_resolve(mm_kwargs, "image")
            model_name = self.info.ctx.model_config.served_model_name
            metrics.record_request(model_name, method, items, ratios)
            response.note_request(method, items, ratios)

    def _tp_text_ids(self, prompt: Sequence[int] | str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        special = getattr(self, "_tp_special_ids", None)
        if special is None:
            tok = self.info.get_tokenizer()
            special = frozenset(getattr(tok, "all_special_ids", ()) or ())
            special |= frozenset(self._tp_media_token_ids())
            self._tp_special_ids = special
        ids = [int(t) for t in prompt if int(t) not in special]
        return tuple(ids[-MAX_TEXT_TOKENS:])

    def _tp_media_token_ids(self) -> set[int]:
        hf = self.info.get_hf_config()
        names = ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "image_token_index", "video_token_index")
        return {int(v) for n in names if isinstance(v := getattr(hf, n, None), int)}

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        text_ids = _prompt_text_ids.get()
        out = {}
        for modality, items in hashes.items():
            _, method = self._tp_resolve(inputs.hf_processor_mm_kwargs, modality)
            if method in TEXT_CONDITIONED_METHODS and text_ids is not None:
                salt = hashlib.sha256(repr(text_ids).encode()).hexdigest()[:32]
                items = [f"{h}-tp{salt}" for h in items]
            out[modality] = items
        return out

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        """Run the model's own HF processing without our request fields, then add the per-item
        pruning fields to its output (only for the items processed now: cached items keep
        theirs, and the cache key includes the request fields)."""
        clean = {k: v for k, v in hf_kwargs.items() if k not in REQUEST_FIELDS}
        out = super()._apply_hf_processor_main(mm_items, clean)  # type: ignore[misc]
        self._tp_add_fields(out, hf_kwargs)
        return out

    def _tp_add_fields(self, out: Any, mm_kwargs: Mapping[str, object]) -> None:
        cfg = self._tp_config()
        text_ids = _prompt_text_ids.get() or ()
        for modality in ("image", "video"):
            layouts = self._tp_item_layouts(modality, out)
            if layouts is None:
                continue
            ratio, method = self._tp_resolve(mm_kwargs, modality)
            rows = [
                lay.row(num_kept(lay.num_tokens, ratio, cfg.min_keep), METHOD_IDS[method])
                for lay in layouts
            ]
            width = max((len(r) for r in rows), default=PARAMS_HEAD)
            out[params_key(modality)] = torch.tensor(rows, dtype=torch.long).reshape(-1, width)
            if method in TEXT_CONDITIONED_METHODS:
                ids = torch.full((len(rows), MAX_TEXT_TOKENS), -1, dtype=torch.long)
                if text_ids:
                    ids[:, : len(text_ids)] = torch.tensor(text_ids, dtype=torch.long)
                out[text_key(modality)] = ids

    def _tp_fields_config(self, hf_inputs: Mapping[str, object]) -> dict[str, Any]:
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = {}
        for modality in ("image", "video"):
            for key in (params_key(modality), text_key(modality)):
                if key in hf_inputs:
                    fields[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        base = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)  # type: ignore[misc]
        return dict(**base, **self._tp_fields_config(hf_inputs))

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Any:
        """The model's own placeholder replacement, cut to the item's keep-count."""
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )
        return [self._tp_wrap_update(u, out_mm_kwargs) for u in updates]

    def _tp_wrap_update(self, update: Any, out_mm_kwargs: Any) -> Any:
        from dataclasses import replace

        modality = update.modality
        original = update.replacement

        def pruned(item_idx: int, _orig: Callable[[int], Any] = original) -> Any:
            full = _orig(item_idx) if callable(_orig) else _orig
            item = out_mm_kwargs[modality][item_idx]
            if params_key(modality) not in item:  # e.g. precomputed embeddings: not pruned
                return full
            params = ItemParams.from_row(item[params_key(modality)].data.tolist())
            tokens = [int(t) for t in getattr(full, "full", full)]
            return self._tp_pruned_tokens(modality, tokens, params)

        return replace(update, replacement=pruned)


# --------------------------------------------------------------------------- model side


class TokenPruneModelMixin:
    """Mix into a vLLM multimodal model class, before it in the MRO.

    ``__init__`` runs the model's own and then :meth:`_tp_setup`. Subclasses implement
    ``embed_multimodal`` with :meth:`_tp_select` and, for M-RoPE models, :meth:`_tp_prune`
    and ``recompute_mrope_positions`` (:meth:`_tp_recompute_mrope_positions`).
    """

    tp_config: TokenPruneConfig
    #: The LM uses M-RoPE: kept rows carry their unpruned positions (POS_CHANNELS extra
    #: channels) until ``recompute_mrope_positions`` strips them. False for 1-D RoPE (LLaVA).
    tp_mrope: ClassVar[bool] = True

    def __init__(self, *, vllm_config: Any = None, prefix: str = "", **kwargs: Any) -> None:
        # vLLM passes (vllm_config=, prefix=) to classes whose __init__ names them.
        if vllm_config is None:  # not built by vLLM (unit tests of the helpers)
            super().__init__(**kwargs)
            return
        self._tp_pre_init(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tp_setup(vllm_config)

    def _tp_pre_init(self, vllm_config: Any) -> None:
        """Before the model's own ``__init__``: refuse EVS; switch multimodal pruning on."""
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and (mm_config.video_pruning_rate or 0) > 0:
            raise ValueError(
                "vllm-tokenprune: --video-pruning-rate (vLLM's EVS) cannot be combined with a "
                "TokenPrune architecture; set token_prune.video_prune_ratio instead."
            )
        # vLLM's model runner calls `recompute_mrope_positions` only when the multimodal config
        # says pruning is enabled (its EVS switch is `video_pruning_rate`). Pruning is always
        # possible on a TokenPrune model (per request), so switch it on for this instance,
        # before the model builds its layers (Qwen3-VL sizes its M-RoPE cache from it).
        if self.tp_mrope and mm_config is not None:
            object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)

    def _tp_setup(self, vllm_config: Any) -> None:
        from vllm_tokenprune import metrics
        from vllm_tokenprune.plugin import check_request_bridge

        model_config = vllm_config.model_config
        self.tp_config = config_from_hf_config(model_config.hf_config)
        check_request_bridge()
        metrics.init_worker(model_config.served_model_name)
        if self.tp_mrope:
            self.is_multimodal_pruning_enabled = True

    def _tp_embed_width(self) -> int:
        """Width of a media embedding row as the LM's ``embed_input_ids`` expects it."""
        return int(self.config.get_text_config().hidden_size)  # type: ignore[attr-defined]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None,
                        **kwargs: Any) -> torch.Tensor:
        """Guard: rows still carrying position channels mean the model runner never called
        ``recompute_mrope_positions`` (vLLM 0.32's ``CPUModelRunner.load_model`` skips the
        switch; ``scripts/cpu_dev_shims.py`` restores it). Serve rather than crash: strip the
        channels, keep the provisional positions, and say so once."""
        if self.tp_mrope and multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            if multimodal_embeddings[0].shape[-1] == self._tp_embed_width() + POS_CHANNELS:
                if not getattr(self, "_tp_warned_no_recompute", False):
                    self._tp_warned_no_recompute = True
                    logger.error(
                        "vllm-tokenprune: the model runner did not call "
                        "recompute_mrope_positions, so kept visual tokens get approximate "
                        "positions. On vLLM CPU builds install scripts/cpu_dev_shims.py "
                        "(scripts/setup-cpu.sh does)."
                    )
                multimodal_embeddings = [m[:, :-POS_CHANNELS] for m in multimodal_embeddings]
        return super().embed_input_ids(  # type: ignore[misc]
            input_ids, multimodal_embeddings, **kwargs
        )

    def _tp_text_embeds(self, ids_row: torch.Tensor, device: torch.device) -> torch.Tensor:
        ids = ids_row[ids_row >= 0].to(device)
        return self.get_language_model().embed_input_ids(ids)  # type: ignore[attr-defined]

    def _tp_params(self, params: torch.Tensor | None, sizes: Sequence[int],
                   grids: Sequence[Grid | None] | None = None) -> list[ItemParams]:
        """The batch's params rows (CPU tensor: no device sync). Without them (e.g. dummy
        profiling inputs from an older cache entry) every item keeps all of its tokens."""
        if params is None:
            method = self.tp_config.method
            grids = grids or [None] * len(sizes)
            return [ItemParams(n, method, n, g, ()) for n, g in zip(sizes, grids, strict=True)]
        rows = params.reshape(len(sizes), -1).tolist()
        out = [ItemParams.from_row(r) for r in rows]
        for p, n in zip(out, sizes, strict=True):
            if p.num_tokens != n:
                raise RuntimeError(
                    f"vllm-tokenprune: the encoder produced {n} tokens for an item the "
                    f"processor counted {p.num_tokens} for"
                )
        return out

    def _tp_select(
        self,
        modality: str,
        feats: Sequence[torch.Tensor],
        params: Sequence[ItemParams],
        text_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor | None]:
        """Each item's kept row indices (ascending; None: it keeps all of its tokens).

        ``feats`` are what the scorer sees (N_i, D) per item; ``params[i].grid`` their layout.
        One batched scorer call per method in the batch.
        """
        from vllm_tokenprune import metrics

        keep_idx: list[torch.Tensor | None] = [None] * len(feats)
        by_method: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if p.num_keep < feats[i].shape[0]:
                by_method[p.method].append(i)
        for method, items in by_method.items():
            text = None
            if method in TEXT_CONDITIONED_METHODS and text_ids is not None:
                text = [self._tp_text_embeds(text_ids[i], feats[i].device) for i in items]
                text = [t if t.shape[0] > 0 else None for t in text]
            start = time.perf_counter()
            selected = select_tokens_batch(
                [feats[i] for i in items],
                [params[i].num_keep for i in items],
                method,
                text_embeds=text,
                grids=[params[i].grid for i in items],
                **self.tp_config.options_for(method),
            )
            elapsed = time.perf_counter() - start
            for i, idx in zip(items, selected, strict=True):
                keep_idx[i] = idx
            metrics.record_scorer_time(method, modality, elapsed)
        return keep_idx

    def _tp_score_view(self, emb: torch.Tensor) -> torch.Tensor:
        """The part of an item's embedding rows the scorer sees (Qwen3-VL: not the deepstack
        copies appended to each row)."""
        return emb

    def _tp_keep_rows(
        self,
        modality: str,
        embeds: Sequence[torch.Tensor],
        params: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """1-D RoPE models: each item's kept rows, in order (contiguous positions)."""
        items = self._tp_params(params, [e.shape[0] for e in embeds])
        keep = self._tp_select(modality, [self._tp_score_view(e) for e in embeds], items,
                               text_ids)
        return tuple(
            e if idx is None else e.index_select(0, idx)
            for e, idx in zip(embeds, keep, strict=True)
        )

    def _tp_prune(
        self,
        modality: str,
        embeds: Sequence[torch.Tensor],
        grids: Sequence[Grid],
        t_factors: Sequence[float],
        params: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """M-RoPE models: select each item's kept rows; append their encoded unpruned
        positions (``grids``: the items' LM token grids, ``t_factors``: time-step scaling)."""
        items = self._tp_params(params, [e.shape[0] for e in embeds], grids)
        keep = self._tp_select(modality, [self._tp_score_view(e) for e in embeds], items,
                               text_ids)
        out = []
        for i, emb in enumerate(embeds):
            t, h, w = grids[i]
            pos = full_positions(t, h, w, t_factors[i])
            idx = keep[i]
            if idx is not None:
                emb = emb.index_select(0, idx)
                pos = pos.index_select(0, idx.cpu())
            out.append(self._tp_with_positions(emb, pos[:, :3]))
        return tuple(out)

    @staticmethod
    def _tp_with_positions(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Append (n, 3) relative positions to (n, D) rows as POS_CHANNELS channels."""
        enc = encode_positions(pos, rows.dtype).to(rows.device, non_blocking=True)
        return torch.cat([rows, enc], dim=1)

    def _tp_recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
        *,
        media_token_ids: Sequence[int],
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """``SupportsMultiModalPruning.recompute_mrope_positions`` for pruned media.

        ``mrope_positions`` already holds the right positions for every text token (see
        :func:`mrope_positions_for_spans`); this fills in the real positions of the kept media
        slots whose embeddings this step carries. The embeddings are the media placeholder
        tokens from ``num_computed_tokens`` on, in prompt order (a chunk may end or start
        inside an item, or span several items), so each row is matched to its placeholder
        token directly; its item's base position is that of the token before the item's
        placeholder run, plus one.
        """
        embeds = [mm[:, :-POS_CHANNELS] for mm in multimodal_embeddings]
        positions = mrope_positions.clone()
        if not multimodal_embeddings:
            return embeds, positions, int(positions.max()) + 1 - positions.shape[1]
        rel = torch.cat(
            [decode_positions(mm[:, -POS_CHANNELS:]).cpu() for mm in multimodal_embeddings], dim=1
        )
        ids = torch.as_tensor(input_ids).cpu().long()
        positions_cpu = positions.cpu()
        media = torch.zeros_like(ids, dtype=torch.bool)
        for token_id in media_token_ids:
            media |= ids == token_id
        run_start = media.clone()
        run_start[1:] &= ~media[:-1]
        run_index = torch.cumsum(run_start.long(), dim=0) - 1
        starts = run_start.nonzero().flatten()
        targets = media[num_computed_tokens:].nonzero().flatten()[: rel.shape[1]]
        targets += num_computed_tokens
        if targets.numel() != rel.shape[1]:
            raise RuntimeError(
                f"vllm-tokenprune: {rel.shape[1]} media embeddings but only {targets.numel()} "
                "media placeholders left in the prompt"
            )
        item_start = starts[run_index[targets]]
        base = positions_cpu[0, (item_start - 1).clamp(min=0)] + 1
        positions_cpu[:, targets] = rel + base
        positions = positions_cpu.to(mrope_positions.device)
        delta = int(positions_cpu.max()) + 1 - positions_cpu.shape[1]
        return embeds, positions, delta


def mrope_positions_for_spans(
    input_tokens: Sequence[int], media: Sequence[MediaSpan]
) -> tuple[torch.Tensor, int]:
    """M-RoPE positions for a prompt whose media placeholders were cut to their pruned spans.

    ``media`` sorted by offset. Text tokens get exactly the positions they would have in the
    unpruned prompt. Media slots get provisional positions (the first ``length`` of the item's
    unpruned ones); the model's ``recompute_mrope_positions`` replaces them with the kept
    slots' real positions once their embeddings exist. Returns (positions (3, n), delta).
    """
    chunks: list[torch.Tensor] = []
    st = 0  # index in input_tokens
    next_pos = 0  # position of the next text token
    for span in media:
        text_len = span.offset - st
        chunks.append(torch.arange(text_len).expand(3, text_len) + next_pos)
        base = next_pos + text_len
        chunks.append(span.positions[: span.length, :3].T + base)
        next_pos = base + span.next_offset
        st = span.offset + span.length
    if st < len(input_tokens):
        text_len = len(input_tokens) - st
        chunks.append(torch.arange(text_len).expand(3, text_len) + next_pos)
        next_pos += text_len
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    delta = next_pos - len(input_tokens)
    return positions, delta


def mrope_positions_for_pruned_prompt(
    input_tokens: Sequence[int],
    media: Sequence[tuple[int, int, int, int, int, float]],
) -> tuple[torch.Tensor, int]:
    """:func:`mrope_positions_for_spans` for grid items: ``media`` holds
    (offset, length, t, h, w, t_factor) per item, sorted by offset, where ``length`` is the
    pruned placeholder count and (t, h, w) the unpruned LM token grid."""
    return mrope_positions_for_spans(input_tokens, [MediaSpan.of_grid(*m) for m in media])
