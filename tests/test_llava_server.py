"""TokenPruneLlavaForConditionalGeneration on a real vLLM CPU server (tiny LLaVA-1.5: CLIP at
112 px, an 8x8 token grid per image, 1-D RoPE); the shared suite in tests/_suite.py. Every image
has the same N (the tower's fixed resolution), so several sizes check the resize path only."""

from __future__ import annotations

import pytest

from tests._suite import FamilyServerSuite
from vllm_tokenprune.testing.tiny_model import build_llava

pytestmark = pytest.mark.server


class TestLlava(FamilyServerSuite):
    ARCH = "TokenPruneLlavaForConditionalGeneration"
    NAME = "llava"
    BUILDER = staticmethod(build_llava)
    CASES = [
        [("image", 224, 224, 1)],
        [("image", 448, 308, 2)],
        [("image", 280, 168, 3), ("image", 336, 420, 4)],
    ]
    EXACT_MEDIA = [("image", 336, 252, 5), ("image", 224, 280, 6)]
    MIXED_MEDIA = [("image", 224, 224, 7), ("image", 308, 196, 8), ("image", 252, 336, 9)]
