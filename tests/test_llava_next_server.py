"""TokenPruneLlavaNextForConditionalGeneration on a real vLLM CPU server (tiny LLaVA-NeXT: 56-px
tiles, any-resolution grids of 1x2, 2x1, 2x2, 1x3, 3x1 tiles plus the base image, image-newline
tokens); the shared suite in tests/_suite.py. Image sizes are chosen to hit different tile grids
and different unpadding, so N and the number of newline tokens vary per image; the budget is
global per image and every newline is kept (vllm_tokenprune/models/llava_next.py)."""

from __future__ import annotations

import pytest

from tests._hf_reference import scored_tokens
from tests._suite import FamilyServerSuite, make_media
from vllm_tokenprune.testing.tiny_model import build_llava_next

pytestmark = pytest.mark.server


class TestLlavaNext(FamilyServerSuite):
    ARCH = "TokenPruneLlavaNextForConditionalGeneration"
    NAME = "llava_next"
    BUILDER = staticmethod(build_llava_next)
    # (visual tokens N, newline tokens) per image of the tiny model in the comments
    CASES = [
        [("image", 224, 224, 1)],   # 2x2 tiles: (80, 8)
        [("image", 300, 180, 2)],   # 2x1 tiles, padding rows removed: (48, 4)
        [("image", 120, 330, 3)],   # 1x3 tiles: (64, 12)
        [("image", 336, 252, 4), ("image", 500, 200, 5)],  # (64, 6) and 3x1 tiles (56, 4)
    ]
    EXACT_MEDIA = [("image", 336, 252, 5), ("image", 150, 260, 6)]
    MIXED_MEDIA = [("image", 224, 224, 7), ("image", 300, 180, 8), ("image", 120, 330, 9)]

    def test_cases_cover_several_tile_layouts(self, model_dir):
        """The accounting cases really differ in visual and newline token counts."""
        counts = {scored_tokens(model_dir, make_media(s)) for case in self.CASES for s in case}
        assert len({n for n, _ in counts}) >= 4
        assert len({rows for _, rows in counts}) >= 3
