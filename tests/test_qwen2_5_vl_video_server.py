"""Video (and mixed image + video) on TokenPruneQwen2_5_VLForConditionalGeneration: the shared
suite of tests/_suite.py run against the session's Qwen2.5-VL servers (tests/conftest.py), with
videos sent as mp4 ``video_url`` data URLs and decoded by vLLM's OpenCV loader. Qwen2.5-VL scales
video time positions by ``second_per_grid_ts * tokens_per_second``; the reference test checks
the kept tokens' positions against transformers' Qwen2.5-VL. Also: vLLM's EVS
(``--video-pruning-rate``) with a TokenPrune architecture refuses to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._suite import FamilyServerSuite
from tests.conftest import QWEN25_ARCH
from vllm_tokenprune.testing.server import VLLMServer, run_until_exit, token_prune_overrides
from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

pytestmark = pytest.mark.server


class TestQwen2_5_VLVideo(FamilyServerSuite):
    ARCH = QWEN25_ARCH
    NAME = "qwen2_5_vl"
    BUILDER = staticmethod(build_qwen2_5_vl)
    CASES = [
        [("video", 112, 84, 8, 1)],
        [("video", 140, 112, 6, 2)],
        [("image", 224, 224, 3), ("video", 112, 84, 8, 1)],
        [("video", 112, 84, 8, 4), ("video", 84, 112, 4, 5)],
    ]
    EXACT_MEDIA = [("image", 280, 224, 5), ("video", 112, 84, 8, 1)]
    MIXED_MEDIA = [("video", 112, 84, 8, 3), ("image", 224, 224, 7), ("video", 140, 112, 6, 4),
                   ("image", 308, 196, 8)]

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_qwen_dir: Path) -> Path:
        return tiny_qwen_dir

    @pytest.fixture(scope="class")
    @classmethod
    def servers(cls, tp_server: VLLMServer,
                plain_server: VLLMServer) -> tuple[VLLMServer, VLLMServer]:
        return tp_server, plain_server


def test_evs_with_tokenprune_refuses_to_start(tiny_qwen_dir: Path) -> None:
    """vLLM's EVS and TokenPrune would both prune the same video tokens: refused, with the
    field to use instead."""
    overrides = token_prune_overrides(QWEN25_ARCH, prune_ratio=0.5)
    code, out = run_until_exit(tiny_qwen_dir, ["--dtype", "float32", "--video-pruning-rate",
                                               "0.5", "--hf-overrides", overrides])
    assert code is not None and code != 0, out[-3000:]
    assert "--video-pruning-rate (vLLM's EVS) cannot be combined" in out, out[-3000:]
    assert "video_prune_ratio" in out
