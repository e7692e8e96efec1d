"""Start-up refusals for configurations the plugin does not support, on real CPU servers:
an unsupported vLLM version and pipeline parallelism with an M-RoPE family. Each server fails
fast (seconds to a minute) instead of serving wrong output."""

from __future__ import annotations

import pytest

from tests.conftest import QWEN25_ARCH
from vllm_tokenprune import _vllm_internals as internals
from vllm_tokenprune.testing.server import run_until_exit, token_prune_overrides

pytestmark = pytest.mark.server


def test_unsupported_vllm_version_refuses_to_start(tiny_qwen_dir):
    """The plugin's version check runs in vLLM's general-plugin hook, before the engine
    starts. The installed vLLM is made to read as 0.34.0 through the test-only variable."""
    overrides = token_prune_overrides(QWEN25_ARCH, prune_ratio=0.5)
    code, out = run_until_exit(
        tiny_qwen_dir, ["--dtype", "float32", "--hf-overrides", overrides],
        env={internals.PRETEND_VERSION_ENV: "0.34.0"}, timeout=240)
    assert code is not None and code != 0, out[-3000:]
    assert "vLLM 0.34.0 is not supported" in out, out[-3000:]
    assert "pip install 'vllm>=0.32.0,<0.34'" in out, out[-3000:]


def test_pipeline_parallel_with_mrope_refuses_to_start(tiny_qwen_dir):
    """--pipeline-parallel-size 2 with TokenPrune Qwen2.5-VL: the workers refuse while building
    the model, naming the flag. The CPU build runs PP=2 when each stage's worker gets its own
    cores (VLLM_CPU_OMP_THREADS_BIND); plain Qwen2.5-VL starts that way (checked by hand, not
    here, to save a server start)."""
    overrides = token_prune_overrides(QWEN25_ARCH, prune_ratio=0.5)
    code, out = run_until_exit(
        tiny_qwen_dir, ["--dtype", "float32", "--pipeline-parallel-size", "2",
                        "--hf-overrides", overrides],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, timeout=300)
    assert code is not None and code != 0, out[-3000:]
    assert "--pipeline-parallel-size 2 is not supported" in out, out[-3000:]
