"""Layout helpers of the per-architecture integrations (pure torch, no server): the params row
format, Qwen3-VL's video span positions, LLaVA-NeXT's newline slots."""

from __future__ import annotations

import pytest
import torch

from vllm_tokenprune.models.positions import (
    MediaSpan,
    full_positions,
    mrope_positions_for_pruned_prompt,
    mrope_positions_for_spans,
    row_separator_mask,
    span_positions,
)
from vllm_tokenprune.models.wire import METHOD_IDS, ItemLayout, ItemParams


def test_params_row_roundtrip():
    row = ItemLayout(80, None, (16, 8, 8)).row(20, METHOD_IDS["lrcp"])
    p = ItemParams.from_row(row)
    assert p == ItemParams(20, "lrcp", 80, None, (16, 8, 8))
    q = ItemParams.from_row(ItemLayout(24, (2, 3, 4)).row(5, METHOD_IDS["uniform"]))
    assert q.grid == (2, 3, 4) and q.extra == () and q.method == "uniform"


def test_span_positions_frames_after_timestamp_text():
    # Qwen3-VL video, 2 frames of a (1, 2, 3) grid: "ts ts vs [frame] ve ts vs [frame] ve"
    v, t = 9, 1
    tokens = [t, t, 5] + [v] * 6 + [6, t, 5] + [v] * 6 + [6]
    pos = span_positions(tokens, v, 2, 3)
    assert pos[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    frame1 = full_positions(1, 2, 3)[:, :3] + 3
    assert torch.equal(pos[3:9], frame1)
    # after a frame the text continues at its start + max(h, w)
    assert pos[9].tolist() == [6, 6, 6] and pos[11].tolist() == [8, 8, 8]
    assert torch.equal(pos[12:18], full_positions(1, 2, 3)[:, :3] + 9)
    assert pos[18].tolist() == [12, 12, 12]
    with pytest.raises(ValueError):
        span_positions([v] * 4, v, 2, 3)  # a run shorter than one frame


def test_spans_with_text_slots_keep_text_after_at_unpruned_positions():
    v = 9
    full = [1, 5] + [v] * 4 + [6]  # one frame (1, 2, 2) with its text around it
    rel = span_positions(full, v, 2, 2)
    # prompt: 2 text tokens, the pruned span (3 text slots + 1 kept token = 4), 1 text token
    tokens = [0, 0] + [v] * 4 + [0]
    pos, delta = mrope_positions_for_spans(tokens, [MediaSpan.of_positions(2, 4, rel)])
    unpruned_next = 2 + int(rel.max()) + 1
    assert pos[:, -1].tolist() == [unpruned_next] * 3
    assert delta == unpruned_next + 1 - len(tokens)


def test_grid_spans_are_the_old_media_tuples():
    tokens = [0] * 3 + [9] * 5 + [0] * 2
    media = [(3, 5, 1, 4, 6, 1.0)]
    a = mrope_positions_for_pruned_prompt(tokens, media)
    b = mrope_positions_for_spans(tokens, [MediaSpan.of_grid(*media[0])])
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_llava_next_newline_slots():
    mask = row_separator_mask(4 + 2 * (3 + 1), 4, 2, 3)
    assert mask.nonzero().flatten().tolist() == [7, 11]
    assert row_separator_mask(5, 4, 1, 0).nonzero().flatten().tolist() == [4]  # base + 1
    with pytest.raises(RuntimeError):
        row_separator_mask(10, 4, 2, 3)
