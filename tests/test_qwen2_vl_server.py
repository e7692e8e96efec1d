"""TokenPruneQwen2VLForConditionalGeneration on a real vLLM CPU server (tiny Qwen2-VL): images
of several sizes and videos (mp4 through ``video_url``), the shared suite in tests/_suite.py."""

from __future__ import annotations

import pytest

from tests._suite import FamilyServerSuite
from vllm_tokenprune.testing.tiny_model import build_qwen2_vl

pytestmark = pytest.mark.server


class TestQwen2VL(FamilyServerSuite):
    ARCH = "TokenPruneQwen2VLForConditionalGeneration"
    NAME = "qwen2_vl"
    BUILDER = staticmethod(build_qwen2_vl)
    CASES = [
        [("image", 224, 224, 1)],
        [("image", 448, 308, 2)],
        [("image", 280, 168, 3), ("image", 336, 420, 4)],
        [("video", 112, 84, 8, 1)],
        [("image", 196, 196, 5), ("video", 140, 112, 6, 2)],
    ]
    EXACT_MEDIA = [("image", 336, 252, 5), ("video", 112, 84, 8, 1)]
    MIXED_MEDIA = [("image", 224, 224, 7), ("video", 112, 84, 8, 3), ("image", 308, 196, 8),
                   ("video", 140, 112, 6, 4)]
