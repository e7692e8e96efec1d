"""A bad ``token_prune`` block, or a TokenPrune model without the request bridge, stops a real
vLLM server at start-up with a message that says what is wrong."""

from __future__ import annotations

import pytest

from tests.conftest import QWEN25_ARCH
from vllm_tokenprune.testing.server import run_until_exit, token_prune_overrides

pytestmark = pytest.mark.server

BAD_CONFIGS = [
    ({"method": "magic"}, "token_prune.method: unknown method 'magic'"),
    ({"prune_ratio": 1.0}, "token_prune.prune_ratio: must be in [0, 1)"),
    ({"ratio": 0.5}, "token_prune.ratio: unknown key"),
    # alvts needs whole items per step; prefix caching is vLLM's default
    ({"method": "alvts"}, "'alvts' (method or allowed_methods), which must see all of an item's "
                          "tokens in one step, and a prefix-cache hit can end inside an image: "
                          "start the server with --no-enable-prefix-caching"),
    # (a bad options.alvts block takes the same path as "ratio": tests/test_alvts_config.py)
]


@pytest.mark.parametrize("block,message", BAD_CONFIGS,
                         ids=["method", "ratio", "unknown-key", "alvts-prefix-caching"])
def test_bad_config_refuses_to_start(tiny_qwen_dir, block, message):
    overrides = token_prune_overrides(QWEN25_ARCH, **block)
    code, out = run_until_exit(tiny_qwen_dir, ["--dtype", "float32", "--hf-overrides", overrides])
    assert code is not None and code != 0, out[-3000:]
    assert message in out, out[-3000:]


def test_missing_endpoint_plugin_refuses_to_start(tiny_qwen_dir):
    """VLLM_PLUGINS unset: vLLM loads the model plugin but not the endpoint plugin, so requests'
    prune_ratio would be dropped; the server refuses to start and says what to set."""
    overrides = token_prune_overrides(QWEN25_ARCH, prune_ratio=0.5)
    code, out = run_until_exit(tiny_qwen_dir, ["--dtype", "float32", "--hf-overrides", overrides],
                               env={"VLLM_PLUGINS": None})
    assert code is not None and code != 0, out[-3000:]
    assert "VLLM_PLUGINS=tokenprune" in out, out[-3000:]
