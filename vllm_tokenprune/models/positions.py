"""M-RoPE positions of pruned prompts: unpruned layouts, provisional prompt positions, and
the fill that gives kept media tokens their unpruned positions (runs in the worker).

The prompt's text positions are laid out as in the unpruned prompt from the start
(:func:`mrope_positions_for_spans`), and vLLM's model runner hands each prefill step's media
rows back through ``SupportsMultiModalPruning.recompute_mrope_positions``, where the kept tokens
get their original positions (:func:`fill_media_positions`). That hook is vLLM's; the position
fill is ours because vLLM's EVS helper (``evs.recompute_mrope_positions``) misplaces tokens when
one prefill chunk carries the end of one item and the start of the next (seen with two images
and ``--max-num-batched-tokens 96``).

A media item's placeholder is a *span*: the slots the model fills with embedding rows. Usually
all of them are visual tokens; a Qwen3-VL video's span also holds the timestamp text and frame
delimiters between frames (see :mod:`.qwen3_vl`). A pruned span keeps every non-visual slot and
the kept visual ones, in order, each at its unpruned position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


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


def fill_media_positions(
    input_ids: list[int] | torch.Tensor,
    rel: torch.Tensor,
    mrope_positions: torch.Tensor,
    num_computed_tokens: int,
    media_token_ids: Sequence[int],
) -> torch.Tensor:
    """Positions with this step's kept media slots filled in (CPU int64, a new tensor).

    ``rel`` (3, n): the unpruned positions, relative to their item's start, of the n media rows
    this step carries: the media placeholder tokens from ``num_computed_tokens`` on, in prompt
    order (a chunk may end or start inside an item, or span several items), so each row is
    matched to its placeholder token directly; its item's base position is that of the token
    before the item's placeholder run, plus one (0 for an item at the prompt's first token).
    """
    ids = torch.as_tensor(input_ids).cpu().long()
    positions_cpu = mrope_positions.cpu().clone()
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
    # An item's base is the position after the token before it; an item at index 0 starts at 0.
    prev = positions_cpu[0, (item_start - 1).clamp(min=0)] + 1
    base = torch.where(item_start > 0, prev, torch.zeros_like(prev))
    positions_cpu[:, targets] = rel + base
    return positions_cpu


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
