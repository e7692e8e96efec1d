"""Start-up refusals: a configuration the plugin cannot serve correctly stops the server with a
message naming what is wrong.

Each refusal is checked in-process through the code a real server runs, on vLLM's own config
object (``EngineArgs(...).create_engine_config()``: vLLM parses the flags and applies
``--hf-overrides`` as ``vllm serve`` does): the API server's request bridge
(:func:`vllm_tokenprune.serving._bridge_state`), the model's set-up before vLLM builds its layers
(``_tp_pre_init``, run in the worker), the plugin hook vLLM runs in every process
(:func:`vllm_tokenprune.plugin.register`), and the worker's bridge check
(:func:`vllm_tokenprune.runtime.check_request_bridge`). One real server start shows that such a
refusal really stops the server: a nonzero exit, the message in its output
(:func:`test_a_refusal_stops_a_real_server`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN25_ARCH
from vllm_tokenprune import _vllm_internals as internals
from vllm_tokenprune.testing.server import run_until_exit, token_prune_overrides

BAD_CONFIGS = [
    ({"method": "magic"}, "token_prune.method: unknown method 'magic'"),
    ({"prune_ratio": 1.0}, "token_prune.prune_ratio: must be in [0, 1)"),
    ({"ratio": 0.5}, "token_prune.ratio: unknown key"),
    # (a bad options.alvts block takes the same path as "ratio": tests/test_alvts_config.py)
]
#: alvts needs whole items per step; vLLM chunks multimodal input by default
ALVTS_CHUNKED = ("'alvts' (method or allowed_methods), which must see all of an item's tokens "
                 "in one step (routing must not depend on how the scheduler chunks a prompt): "
                 "start the server with --disable-chunked-mm-input")


def engine_config(model_dir: Path, block: dict[str, Any] | None = None, **engine_args: Any
                  ) -> Any:
    """vLLM's config of a TokenPrune Qwen2.5-VL server started with these flags (what
    ``vllm serve --dtype float32 --hf-overrides ...`` builds before starting the engine), with
    the test servers' fast CPU flags (``testing.server.FAST_CPU_ARGS``: eager, 4096 tokens)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_tokenprune.plugin import register

    register()
    overrides = json.loads(token_prune_overrides(QWEN25_ARCH, **(block or {"prune_ratio": 0.5})))
    args = EngineArgs(model=str(model_dir), hf_overrides=overrides, dtype="float32",
                      enforce_eager=True, max_model_len=4096, max_num_seqs=16, **engine_args)
    return args.create_engine_config()


def pre_init(vllm_config: Any) -> None:
    """What the worker runs first when vLLM builds the TokenPrune model."""
    from vllm_tokenprune.models.qwen2_5_vl import TokenPruneQwen2_5_VLForConditionalGeneration

    cls = TokenPruneQwen2_5_VLForConditionalGeneration
    cls.__new__(cls)._tp_pre_init(vllm_config)


@pytest.mark.parametrize("block,message", BAD_CONFIGS, ids=["method", "ratio", "unknown-key"])
def test_bad_config_block_is_refused(tiny_qwen_dir: Path, block: dict[str, Any],
                                     message: str) -> None:
    """A bad ``token_prune`` block in ``--hf-overrides``: the API server's request bridge and
    the worker's model set-up both refuse it, naming the key."""
    from vllm_tokenprune.serving import _bridge_state

    config = engine_config(tiny_qwen_dir, block)
    with pytest.raises(ValueError) as api:
        _bridge_state(config, None)
    assert message in str(api.value)
    with pytest.raises(ValueError) as worker:
        pre_init(config)
    assert message in str(worker.value)


def test_alvts_with_chunked_media_is_refused(tiny_qwen_dir: Path) -> None:
    """``alvts`` on ``vllm serve``'s defaults (multimodal input chunked across steps; prefix
    caching on, which alvts serves): refused, with the flag to add."""
    config = engine_config(tiny_qwen_dir, {"method": "alvts"}, enable_prefix_caching=True)
    assert config.cache_config.enable_prefix_caching
    assert not config.scheduler_config.disable_chunked_mm_input
    with pytest.raises(ValueError) as exc:
        pre_init(config)
    assert ALVTS_CHUNKED in str(exc.value)


def test_evs_with_tokenprune_is_refused(tiny_qwen_dir: Path) -> None:
    """vLLM's EVS (``--video-pruning-rate``) and TokenPrune would both prune the same video
    tokens: refused, with the field to use instead."""
    config = engine_config(tiny_qwen_dir, video_pruning_rate=0.5)
    with pytest.raises(ValueError) as exc:
        pre_init(config)
    assert "--video-pruning-rate (vLLM's EVS) cannot be combined" in str(exc.value)
    assert "video_prune_ratio" in str(exc.value)


def test_pipeline_parallel_with_mrope_is_refused(tiny_qwen_dir: Path) -> None:
    """``--pipeline-parallel-size 2`` with TokenPrune Qwen2.5-VL: refused while the worker
    builds the model, naming the flag (vLLM recomputes M-RoPE positions on the first stage
    only)."""
    config = engine_config(tiny_qwen_dir, pipeline_parallel_size=2)
    assert config.parallel_config.pipeline_parallel_size == 2
    with pytest.raises(ValueError) as exc:
        pre_init(config)
    assert "--pipeline-parallel-size 2 is not supported" in str(exc.value)


def test_unsupported_vllm_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's version check runs in vLLM's general-plugin hook, before the engine starts
    (the installed vLLM is made to read as 0.34.0 through the test-only variable)."""
    from vllm_tokenprune.plugin import register

    monkeypatch.setenv(internals.PRETEND_VERSION_ENV, "0.34.0")
    with pytest.raises(RuntimeError) as exc:
        register()
    assert "vLLM 0.34.0 is not supported" in str(exc.value)
    assert "pip install 'vllm>=0.32.0,<0.34'" in str(exc.value)


def test_missing_endpoint_plugin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLM_PLUGINS not naming ``tokenprune``: vLLM loads the model plugin but not the endpoint
    plugin, so requests' prune_ratio would be dropped; the server refuses and says what to
    set (the check runs in every process of a server, which keep the server's ``sys.argv``)."""
    from vllm_tokenprune.runtime import check_request_bridge

    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "/models/x"])
    monkeypatch.delenv("VLLM_TOKENPRUNE_ALLOW_NO_BRIDGE", raising=False)
    for plugins in (None, "", "other"):
        if plugins is None:
            monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("VLLM_PLUGINS", plugins)
        with pytest.raises(RuntimeError, match="VLLM_PLUGINS=tokenprune"):
            check_request_bridge()
    monkeypatch.setenv("VLLM_PLUGINS", "other,tokenprune")
    check_request_bridge()
    monkeypatch.setattr(sys, "argv", ["python", "-m", "pytest"])  # not a server: no check
    monkeypatch.delenv("VLLM_PLUGINS")
    check_request_bridge()


@pytest.mark.server
def test_a_refusal_stops_a_real_server(tiny_qwen_dir: Path) -> None:
    """The in-process refusals above really stop a server: vLLM runs the plugin's hook without
    swallowing its error (it does swallow errors raised while importing a plugin), the process
    exits nonzero and its output has the message. The version refusal is the cheapest real one
    (it stops the API server before the engine starts: about 10 s)."""
    overrides = token_prune_overrides(QWEN25_ARCH, prune_ratio=0.5)
    code, out = run_until_exit(tiny_qwen_dir, ["--dtype", "float32", "--hf-overrides", overrides],
                               env={internals.PRETEND_VERSION_ENV: "0.34.0"}, timeout=240)
    assert code is not None and code != 0, out[-3000:]
    assert "vLLM 0.34.0 is not supported" in out, out[-3000:]
