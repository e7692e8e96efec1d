"""Position bookkeeping of the shared model mixin (pure torch; imports vLLM's EVS-free parts)."""

from __future__ import annotations

import torch

from vllm_tokenprune.models.positions import full_positions, mrope_positions_for_pruned_prompt
from vllm_tokenprune.models.wire import decode_positions, encode_positions


def test_full_positions_grid_and_next_offset():
    pos = full_positions(2, 3, 4, t_factor=2.5)
    assert pos.shape == (24, 4)
    assert pos[:, 0].unique().tolist() == [0, 2]
    assert pos[:, 1].max() == 2 and pos[:, 2].max() == 3
    assert (pos[:, 3] == 4).all()  # max(2, 2, 3) + 1


def test_position_encoding_roundtrip_exact_in_bf16():
    pos = torch.tensor([[0, 0, 0], [255, 256, 257], [1000, 4095, 65535]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(decode_positions(encode_positions(pos, dtype)), pos.T)


def test_text_after_pruned_media_keeps_unpruned_positions():
    # 3 text tokens, an image of grid (1, 4, 6) = 24 tokens pruned to 5, then 2 text tokens
    tokens = [0] * 3 + [9] * 5 + [0] * 2
    pos, delta = mrope_positions_for_pruned_prompt(tokens, [(3, 5, 1, 4, 6, 1.0)])
    assert pos.shape == (3, 10)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    # unpruned: text after the image starts at 3 + max(0, 3, 5) + 1 = 9
    assert pos[:, 8].tolist() == [9, 9, 9] and pos[:, 9].tolist() == [10, 10, 10]
    assert delta == 11 - 10


def test_recompute_fills_kept_positions_across_any_chunking():
    """Two pruned images; embeddings arrive split at every possible chunk boundary."""
    from vllm_tokenprune.models.model_hooks import TokenPruneModelMixin

    img = 7
    kept_a = torch.tensor([0, 5, 11, 23])  # of a (1, 4, 6) grid
    kept_b = torch.tensor([1, 2, 8])  # of a (1, 3, 3) grid
    tokens = [1, 2] + [img] * 4 + [3, 4] + [img] * 3 + [5]
    media = [(2, 4, 1, 4, 6, 1.0), (8, 3, 1, 3, 3, 1.0)]
    init, _ = mrope_positions_for_pruned_prompt(tokens, media)
    rel_a = full_positions(1, 4, 6)[kept_a, :3]
    rel_b = full_positions(1, 3, 3)[kept_b, :3]
    emb_a = torch.cat([torch.randn(4, 5), encode_positions(rel_a, torch.bfloat16).float()], 1)
    emb_b = torch.cat([torch.randn(3, 5), encode_positions(rel_b, torch.bfloat16).float()], 1)
    expected = init.clone()
    expected[:, 2:6] = rel_a.T + 2  # base: position of the token before the image + 1
    expected[:, 8:11] = rel_b.T + init[0, 7] + 1
    mixin = TokenPruneModelMixin()
    for cut in range(len(tokens) + 1):
        pos = init.clone()
        for start, end in ((0, cut), (cut, len(tokens))):
            # the embedding rows this chunk carries, in prompt order
            rows = []
            if start < 6 and end > 2:
                rows.append(emb_a[max(start, 2) - 2: min(end, 6) - 2])
            if start < 11 and end > 8:
                rows.append(emb_b[max(start, 8) - 8: min(end, 11) - 8])
            rows = [r for r in rows if r.shape[0]]
            _, pos, _ = mixin._tp_recompute_mrope_positions(
                tokens, rows, pos, start, media_token_ids=(img,))
        assert torch.equal(pos, expected), cut
