"""Pixels reach the device one encoder sub-batch at a time, never more than the profiled batch's
(docs/worker-safety.md §1; issue 17, point 3), for every family, in-process.

vLLM's scheduler charges a pruned item its kept tokens, so at ratio 0.9 one step holds about ten
times the pixels vLLM's profile run measured. The processor declares the pixel fields
``keep_on_cpu``: vLLM's ``group_and_batch_mm_kwargs`` (how both runners batch encoder inputs and
move them to the device) leaves them on the host, and the model stages each sub-batch's pixels
just before its vision-tower call. Accounted with the test hook
``VLLM_TOKENPRUNE_TEST_ENCODER_LOG`` (``stage <bytes> <profiled bytes>`` per staging): first
vLLM's profile batch (its dummy, through the V1 runner's own ``_get_mm_dummy_batch``), then one
step of many requests' images at ratio 0.9 batched as the runners batch them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._inproc import FAMILIES, dummy_profile_batch, request_items, vllm_inproc  # noqa: F401
from vllm_tokenprune.models import faults, staging
from vllm_tokenprune.models.wire import STAGED_FIELDS
from vllm_tokenprune.testing.media import make_image

#: Per family: the step budget (a few dummy items per profiled batch) and the step's images
#: (width, height): many sizes, and for LLaVA-NeXT skewed ones whose tiles carry more pixels
#: per token than the dummy's (pixels are not proportional to tokens there).
CASES = {
    "qwen2_vl": (512, [(448, 448), (224, 448), (336, 336), (448, 224), (280, 280)] * 2),
    "qwen2_5_vl": (512, [(448, 448), (224, 448), (336, 336), (448, 224), (280, 280)] * 2),
    "qwen3_vl": (512, [(512, 512), (256, 512), (384, 384), (512, 256), (320, 320)] * 2),
    "llava": (128, [(112, 112), (200, 90), (64, 64), (112, 112), (90, 200)] * 2),
    "llava_next": (176, [(168, 20), (20, 168), (168, 24), (112, 112), (24, 168), (168, 20)] * 2),
}


def _log(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    return [(k, int(a), int(b)) for k, a, b in
            (line.split() for line in path.read_text().splitlines() if line.strip())]


def _pixel_bytes(batch: dict) -> int:
    return sum(staging._nbytes(batch[k]) for k in STAGED_FIELDS if k in batch)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_are_staged_per_sub_batch_within_the_profiled_bytes(vllm_inproc, tmp_path,  # noqa: F811
                                                                   monkeypatch, family):
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    step_tokens, sizes = CASES[family]
    built = vllm_inproc(family, {"method": "lrcp", "prune_ratio": 0.0},
                        max_model_len=2048, max_num_batched_tokens=step_tokens, max_num_seqs=4,
                        limit_mm_per_prompt={"image": 4, "video": 0})
    log = tmp_path / "encoder.log"
    monkeypatch.setattr(faults, "_ENCODER_LOG", str(log))

    # vLLM's profile run: the dummy batch is staged whole, once; its bytes are the budget
    _, _, _, batch = dummy_profile_batch(built)
    built.run(built.model.embed_multimodal, **batch)
    (stage,) = [e for e in _log(log) if e[0] == "stage"]
    profiled = stage[1]
    assert profiled == _pixel_bytes(batch) > 0
    log.unlink()

    # one step: many requests' images at ratio 0.9, as the scheduler hands them to the runner
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    items = [it for i in range(0, len(images), 2)
             for it in request_items(built, images[i:i + 2], prune_ratio=0.9)]
    # both runners batch with group_and_batch_mm_kwargs(device=...): pixels stay on the host
    ((_, num, on_device),) = list(group_and_batch_mm_kwargs(items, device="meta"))
    assert num == len(images)
    for key in STAGED_FIELDS:
        for t in _leaves(on_device.get(key)):
            assert t.device.type == "cpu", key
    ((_, _, step),) = list(group_and_batch_mm_kwargs(items, device="cpu"))
    out = built.run(built.model.embed_multimodal, **step)
    assert len(out) == len(images)

    stages = [e for e in _log(log) if e[0] == "stage"]
    staged = [n for _, n, _ in stages]
    assert all(cap == profiled for _, _, cap in stages)
    assert sum(staged) == _pixel_bytes(step)  # every pixel staged once
    assert sum(staged) > profiled and len(staged) > 1  # the whole step would not have fit
    assert max(staged) <= profiled, (staged, profiled)


def _leaves(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    return []
