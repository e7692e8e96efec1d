"""Model Runner V2's pruning path, driven with vLLM's own classes on the plugin's model.

On GPUs vLLM 0.32/0.33 run Model Runner V2, whose ``MultiModalPruner.recompute``
(``vllm/v1/worker/gpu/model_states/mm_pruning.py``) segments each step's media rows per request
and calls the model's ``recompute_mrope_positions`` with device tensors: the request's
``all_token_ids[:prefill_len]`` (int32), its staged prefill positions read back as int64, and
``num_computed_prefill_tokens``. This test runs vLLM's real ``MultiModalPruner``, ``EncoderCache``,
``RopeState.init_prefill_positions/read_prefill_positions/update_prefill_positions`` and the
plugin's real ``TokenPruneQwen2_5_VLForConditionalGeneration`` methods across prefill splits,
and checks the positions against

* the V1 call convention (``gpu_model_runner._gather_mm_embeddings``: prompt ids as a list,
  the request's CPU int64 positions, copied back in place), and
* vLLM's own ``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`` on the
  *unpruned* prompt, restricted to the kept tokens: kept tokens keep their unpruned places.

Not real here (they need CUDA): RopeState's pinned/UVA buffers are plain CPU tensors with the
same dtypes (int32 positions); the batch is a namespace with the fields ``recompute`` reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm.v1.worker.gpu.model_states.mm_pruning")

from transformers import Qwen2_5_VLConfig  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from vllm.multimodal.inputs import (  # noqa: E402
    MultiModalBatchedField,
    MultiModalFeatureSpec,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
from vllm.multimodal.utils import get_mm_features_in_window  # noqa: E402
from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache  # noqa: E402
from vllm.v1.worker.gpu.mm.rope import RopeState  # noqa: E402
from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner  # noqa: E402

from vllm_tokenprune.models.positions import full_positions  # noqa: E402
from vllm_tokenprune.models.qwen2_5_vl import (  # noqa: E402
    TokenPruneQwen2_5_VLForConditionalGeneration,
)

HIDDEN = 8
MAX_LEN = 128
CFG = Qwen2_5_VLConfig()
IMG = CFG.image_token_id
VS, VE = CFG.vision_start_token_id, CFG.vision_end_token_id
MERGE = CFG.vision_config.spatial_merge_size


def _model() -> TokenPruneQwen2_5_VLForConditionalGeneration:
    """The plugin's model class, not built by vLLM (no weights needed for positions)."""
    model = TokenPruneQwen2_5_VLForConditionalGeneration.__new__(
        TokenPruneQwen2_5_VLForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.config = CFG
    return model


class Item:
    """An image of LM grid (1, h, w) keeping ``keep`` (ascending indices)."""

    def __init__(self, h: int, w: int, keep: list[int], seed: int) -> None:
        self.h, self.w, self.keep = h, w, torch.tensor(keep)
        g = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(len(keep), HIDDEN, generator=g)

    def rows(self, model) -> torch.Tensor:
        """What the plugin's embed_multimodal returns for it: kept rows + position channels."""
        rel = full_positions(1, self.h, self.w)[self.keep, :3]
        return model._tp_with_positions(self.feats, rel)

    def data(self) -> MultiModalKwargsItem:
        grid = torch.tensor([1, self.h * MERGE, self.w * MERGE])
        return MultiModalKwargsItem(
            {"image_grid_thw": MultiModalFieldElem(grid, MultiModalBatchedField())})


def _layout(parts: list) -> tuple[list[int], list[int], list[tuple[int, int, Item]], list[int]]:
    """(pruned ids, unpruned ids, [(pruned offset, unpruned offset, item)], kept unpruned
    indices in pruned order) of a prompt made of text runs (int) and items."""
    pruned: list[int] = []
    full: list[int] = []
    items = []
    kept_index: list[int] = []
    text = 1000
    for part in parts:
        if isinstance(part, int):
            for _ in range(part):
                kept_index.append(len(full))
                pruned.append(text)
                full.append(text)
                text += 1
        elif part in ("vs", "ve"):
            kept_index.append(len(full))
            tok = VS if part == "vs" else VE
            pruned.append(tok)
            full.append(tok)
        else:
            items.append((len(pruned), len(full), part))
            kept_index.extend(len(full) + int(i) for i in part.keep)
            pruned.extend([IMG] * len(part.keep))
            full.extend([IMG] * part.h * part.w)
    return pruned, full, items, kept_index


def _features(items, pruned: bool) -> list[MultiModalFeatureSpec]:
    return [
        MultiModalFeatureSpec(
            data=item.data(), modality="image", identifier=f"img{i}",
            mm_position=PlaceholderRange(offset=p_off if pruned else f_off,
                                         length=len(item.keep) if pruned else item.h * item.w))
        for i, (p_off, f_off, item) in enumerate(items)
    ]


def _window_rows(features, outputs, start: int, end: int) -> list[torch.Tensor]:
    """The media rows a step [start, end) carries, as the runners gather them."""
    lo, hi = get_mm_features_in_window(features, start=start, end=end)
    rows = []
    for f, out in zip(features[lo:hi], outputs[lo:hi], strict=True):
        pos = f.mm_position
        s, e = max(start - pos.offset, 0), min(end - pos.offset, pos.length)
        if s < e:
            rows.append(out[s:e])
    return rows


def _rope_state(num_reqs: int) -> RopeState:
    """vLLM's RopeState with its CUDA-pinned buffers replaced by CPU tensors of the same
    dtypes; its own init/read/update methods run."""
    state = RopeState.__new__(RopeState)
    state.num_dims = 3
    buf = torch.zeros(num_reqs * 3, MAX_LEN, dtype=torch.int32)

    def stage_write(row: int, col: int, values: list[int]) -> None:
        buf[row, col:col + len(values)] = torch.tensor(values, dtype=torch.int32)

    state.prefill_positions = SimpleNamespace(gpu=buf, stage_write=stage_write)
    state.prefill_delta = SimpleNamespace(np=np.zeros(num_reqs, dtype=np.int32))
    return state


A = Item(4, 6, [0, 5, 11, 17, 23], seed=1)
B = Item(3, 3, [1, 2, 8], seed=2)
C = Item(2, 5, [3, 4, 9], seed=3)
REQUESTS = {
    # two images with text around them
    "two-images": [3, "vs", A, "ve", 2, "vs", B, "ve", 3],
    # the prompt's first token is a media placeholder (item at index 0), then another image
    "at-index-0": [C, 2, "vs", B, "ve", 2],
}


def _splits() -> list[tuple[str, list[int]]]:
    p0 = _layout(REQUESTS["two-images"])[2]
    a_mid = p0[0][0] + 2  # inside A
    b_mid = p0[1][0] + 1  # inside B
    return [
        ("one-chunk", []),
        ("image-split-across-two-steps", [a_mid]),
        ("step-ends-inside-first-and-starts-second", [a_mid, b_mid]),
        ("index-0-item-split", [1]),
        *[(f"every-token-{n}", list(range(1, 40, n))) for n in (1, 3)],
    ]


@pytest.mark.parametrize("cuts", [c for _, c in _splits()], ids=[n for n, _ in _splits()])
def test_v2_pruner_matches_v1_and_unpruned_layout(cuts):
    model = _model()
    names = list(REQUESTS)
    layouts = {n: _layout(REQUESTS[n]) for n in names}
    cache = EncoderCache()
    rope = _rope_state(len(names))
    all_ids = torch.zeros(len(names), MAX_LEN, dtype=torch.int32)
    v1_pos, outputs, feats = {}, {}, {}
    for idx, name in enumerate(names):
        pruned, _, items, _ = layouts[name]
        feats[name] = _features(items, pruned=True)
        outputs[name] = [item.rows(model) for _, _, item in items]
        cache.add_request(name, feats[name])
        rope.init_prefill_positions(idx, model, pruned, feats[name])  # V2's call
        all_ids[idx, :len(pruned)] = torch.tensor(pruned, dtype=torch.int32)
        v1_pos[name], _ = model.get_mrope_input_positions(pruned, feats[name])  # V1's call
    pruner = MultiModalPruner(model, rope, cache, inputs_embeds_size=HIDDEN)

    lengths = {n: len(layouts[n][0]) for n in names}
    bounds = {n: [0, *[c for c in cuts if 0 < c < lengths[n]], lengths[n]] for n in names}
    steps = max(len(b) - 1 for b in bounds.values())
    for step in range(steps):
        batch = [n for n in names if step < len(bounds[n]) - 1]
        window = {n: (bounds[n][step], bounds[n][step + 1]) for n in batch}
        flat: list[torch.Tensor] = []
        for n in batch:
            rows = _window_rows(feats[n], outputs[n], *window[n])
            flat.extend(rows)
            if rows:  # V1: gpu_model_runner._gather_mm_embeddings' call
                _, new, delta_v1 = model.recompute_mrope_positions(
                    input_ids=layouts[n][0], multimodal_embeddings=rows,
                    mrope_positions=v1_pos[n], num_computed_tokens=window[n][0])
                v1_pos[n].copy_(new)
        input_batch = SimpleNamespace(
            req_ids=batch,
            idx_mapping_np=np.array([names.index(n) for n in batch]),
            prefill_len_np=np.array([lengths[n] for n in batch]),
            num_computed_prefill_tokens_np=np.array([window[n][0] for n in batch]),
            num_scheduled_tokens=np.array([window[n][1] - window[n][0] for n in batch]),
        )
        req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=all_ids))
        cleaned = pruner.recompute(flat, input_batch, req_states) if flat else []
        assert len(cleaned) == len(flat)
        for c, f in zip(cleaned, flat, strict=True):  # channels stripped, features intact
            assert torch.equal(c, f[:, :HIDDEN])

    for idx, name in enumerate(names):
        pruned, full, items, kept_index = layouts[name]
        unpruned, unpruned_delta = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(
            model, full, _features(items, pruned=False))
        expected = unpruned[:, kept_index].long()
        v2 = rope.read_prefill_positions(idx, len(pruned)).long()
        assert torch.equal(v1_pos[name], expected), (name, v1_pos[name], expected)
        assert torch.equal(v2, expected), (name, v2, expected)
        # the text after the media continues as in the unpruned prompt
        assert int(rope.prefill_delta.np[idx]) == unpruned_delta + len(full) - len(pruned)
