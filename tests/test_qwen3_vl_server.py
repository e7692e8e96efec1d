"""TokenPruneQwen3VLForConditionalGeneration on a real vLLM CPU server (tiny Qwen3-VL with two
deepstack levels): images of several sizes and videos, whose pruned placeholder keeps every
frame's timestamp text (see vllm_tokenprune/models/qwen3_vl.py); the shared suite in
tests/_suite.py. The reference test checks deepstack (only the kept tokens' copies reach the LM
layers) and the interleaved timestamp positions against transformers' Qwen3-VL."""

from __future__ import annotations

import pytest

from tests._suite import FamilyServerSuite
from vllm_tokenprune.testing.tiny_model import build_qwen3_vl

pytestmark = pytest.mark.server


class TestQwen3VL(FamilyServerSuite):
    ARCH = "TokenPruneQwen3VLForConditionalGeneration"
    NAME = "qwen3_vl"
    BUILDER = staticmethod(build_qwen3_vl)
    CASES = [
        [("image", 224, 224, 1)],
        [("image", 448, 320, 2)],
        [("image", 288, 160, 3), ("image", 320, 416, 4)],
        [("video", 112, 84, 8, 1)],
        [("image", 192, 192, 5), ("video", 160, 128, 6, 2)],
    ]
    EXACT_MEDIA = [("image", 320, 256, 5), ("video", 112, 84, 8, 1)]
    MIXED_MEDIA = [("image", 224, 224, 7), ("video", 112, 84, 8, 3), ("image", 320, 192, 8),
                   ("video", 160, 128, 6, 4)]
